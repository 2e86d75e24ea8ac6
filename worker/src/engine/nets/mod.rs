//! The candle networks of SD1.5: the CLIP text encoder ([`clip`]), the UNet ([`unet`]) and the
//! VAE decoder ([`vae`]), built from their configs over [`super::load`]'s weights, with the
//! layers they share ([`layers`]).

pub(crate) mod clip;
pub(crate) mod layers;
pub(crate) mod unet;
pub(crate) mod vae;
