//! Connecting to a coordinator: the `--coordinator URL` / `KILN_COORDINATOR` option shared by
//! every client command, and the tonic clients built from it.

use std::path::PathBuf;

use anyhow::Context;
use kiln_proto::v1::model_service_client::ModelServiceClient;
use kiln_proto::v1::sweep_service_client::SweepServiceClient;
use kiln_worker::agent::access::{self, Access, Credentials};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Default coordinator address.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7450";

/// A token and TLS trust for a coordinator that requires them (`kiln worker` and every client
/// command).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AccessArgs {
    /// Token for a coordinator that requires tokens (`kiln token create`).
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// coordinator with a self-signed
    /// certificate (`kiln cert` makes one).
    #[arg(long, global = true, env = "KILN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl AccessArgs {
    /// As the agent and clients take it.
    pub fn access(&self) -> Access {
        Access {
            token: self.token.clone(),
            tls_ca: self.tls_ca.clone(),
        }
    }
}

/// The sweep service client, every call carrying the token.
pub type SweepClient = SweepServiceClient<InterceptedService<Channel, Credentials>>;

/// Where the coordinator is, and how to get in.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// Coordinator URL, e.g. http://192.168.1.10:7450 or https://farm:7450.
    #[arg(long, global = true, env = "KILN_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    #[command(flatten)]
    pub access: AccessArgs,
}

impl Conn {
    /// A channel to the coordinator (fails fast with the URL in the message).
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let url = &self.coordinator;
        access::endpoint(url, &self.access.access())
            .with_context(|| format!("coordinator URL {url:?}"))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| {
                format!(
                    "connecting to the coordinator at {url} (start one with `kiln coordinator`, \
                     or point --coordinator / KILN_COORDINATOR at yours)"
                )
            })
    }

    /// The sweep service client.
    pub async fn sweeps(&self) -> anyhow::Result<SweepClient> {
        let credentials = Credentials::new(&self.access.access())?;
        Ok(
            SweepServiceClient::with_interceptor(self.channel().await?, credentials)
                .max_decoding_message_size(64 * 1024 * 1024),
        )
    }
}

impl Conn {
    /// The model registry client.
    pub async fn models(&self) -> anyhow::Result<ModelClient> {
        let credentials = Credentials::new(&self.access.access())?;
        Ok(ModelServiceClient::with_interceptor(
            self.channel().await?,
            credentials,
        ))
    }
}

/// The model registry client, every call carrying the token.
pub type ModelClient = ModelServiceClient<InterceptedService<Channel, Credentials>>;

/// The sweep `given` names: an id, or a name (the newest sweep of that name).
pub async fn sweep_id(conn: &Conn, given: &str) -> anyhow::Result<u64> {
    if let Ok(id) = given.parse::<u64>() {
        return Ok(id);
    }
    let mut c = conn.sweeps().await?;
    let mut page_token = String::new();
    loop {
        let page = c
            .list_sweeps(kiln_proto::v1::ListSweepsRequest {
                limit: 1000,
                page_token,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        // Newest first: the first match is the newest sweep of that name.
        if let Some(s) = page.sweeps.iter().find(|s| s.name == given) {
            return Ok(s.id);
        }
        if page.next_page_token.is_empty() {
            anyhow::bail!("no sweep is named {given:?} (`kiln sweeps` lists them)");
        }
        page_token = page.next_page_token;
    }
}

/// [`sweep_id`] of an optional sweep.
pub async fn maybe_sweep_id(conn: &Conn, given: Option<&str>) -> anyhow::Result<Option<u64>> {
    match given {
        Some(g) => Ok(Some(sweep_id(conn, g).await?)),
        None => Ok(None),
    }
}

/// Turns a gRPC status into an error that reads well on a terminal.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

/// S3 connection flags for commands that read or write storage (`fetch`, `run`). Credentials
/// come from KILN_S3_ACCESS_KEY / KILN_S3_SECRET_KEY or AWS_ACCESS_KEY_ID /
/// AWS_SECRET_ACCESS_KEY.
#[derive(Debug, Clone, clap::Args)]
pub struct S3Args {
    /// S3 endpoint URL (Garage, MinIO, Ceph, ...); AWS when unset.
    #[arg(long, env = "KILN_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "KILN_S3_REGION")]
    pub s3_region: Option<String>,
    /// Path-style S3 addressing (most self-hosted servers).
    #[arg(long, env = "KILN_S3_PATH_STYLE")]
    pub s3_path_style: bool,
}

impl S3Args {
    /// The options, with credentials from the environment.
    pub fn options(&self) -> kiln_worker::upload::S3Options {
        let either = |a: &str, b: &str| std::env::var(a).ok().or_else(|| std::env::var(b).ok());
        kiln_worker::upload::S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
            access_key: either("KILN_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
            secret_key: either("KILN_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
        }
    }
}
