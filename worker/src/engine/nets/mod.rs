//! The candle networks of SD1.5: the CLIP text encoder ([`clip`]), the UNet ([`unet`]), the
//! VAE decoder ([`vae`]) and encoder ([`vae_encoder`]), built from their configs over
//! [`super::load`]'s weights, with the layers they share ([`layers`]), the convolution
//! ([`conv`]), the dense layer ([`dense`]), the attention core ([`attention`]) and fused
//! elementwise steps ([`fused`]).

pub(crate) mod attention;
pub(crate) mod clip;
pub(crate) mod conv;
pub(crate) mod dense;
pub(crate) mod fused;
pub(crate) mod layers;
pub(crate) mod unet;
pub(crate) mod vae;
pub(crate) mod vae_encoder;
