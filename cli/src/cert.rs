//! `kiln cert`: a private certificate authority and a server certificate signed by it, for a
//! coordinator that serves TLS (`--tls-cert`, `--tls-key`). Clients and workers trust the CA
//! with `--tls-ca ca.pem`. The CA's key is written beside it for making more certificates
//! later; keep it off the farm's machines.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub const EXAMPLES: &str = "Examples:
  kiln cert --out certs --host farm.lan --host 192.168.1.10
    then: kiln coordinator --listen 0.0.0.0:7450 --require-tokens \\
              --tls-cert certs/server.pem --tls-key certs/server.key
          kiln worker --coordinator https://farm.lan:7450 --tls-ca certs/ca.pem --token …";

/// Flags of `kiln cert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder to write ca.pem, ca.key, server.pem and server.key into (made if missing).
    #[arg(long, default_value = "kiln-certs")]
    out: PathBuf,
    /// Host name or IP address clients use for the coordinator (repeatable).
    #[arg(long = "host", required = true)]
    hosts: Vec<String>,
    /// Overwrite files that exist.
    #[arg(long)]
    force: bool,
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let files = ["ca.pem", "ca.key", "server.pem", "server.key"].map(|f| args.out.join(f));
    if !args.force
        && let Some(f) = files.iter().find(|f| f.exists())
    {
        anyhow::bail!("{} exists (--force to overwrite)", f.display());
    }
    let (ca_pem, ca_key, server_pem, server_key) = make(&args.hosts)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("making {}", args.out.display()))?;
    write(&files[0], &ca_pem, false)?;
    write(&files[1], &ca_key, true)?;
    write(&files[2], &server_pem, false)?;
    write(&files[3], &server_key, true)?;
    eprintln!(
        "wrote {}: give the coordinator --tls-cert server.pem --tls-key server.key, and \
         every client and worker --tls-ca ca.pem (and an https:// coordinator URL)",
        args.out.display()
    );
    Ok(())
}

/// A CA and a server certificate for `hosts`, PEM: (ca cert, ca key, server cert, server key).
pub fn make(hosts: &[String]) -> anyhow::Result<(String, String, String, String)> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "kiln farm CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);
    let key = KeyPair::generate()?;
    let mut server = CertificateParams::new(hosts.to_vec())
        .context("--host: not a valid host name or address")?;
    server
        .distinguished_name
        .push(DnType::CommonName, hosts[0].clone());
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = server.signed_by(&key, &issuer)?;
    Ok((
        ca_cert.pem(),
        ca_key.serialize_pem(),
        cert.pem(),
        key.serialize_pem(),
    ))
}

/// Writes `text` to `path`; a key readable by its owner only (on Unix).
fn write(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    Ok(())
}
