//! Connecting to a coordinator: the `--coordinator URL` / `KILN_COORDINATOR` option shared by
//! every client command, and the tonic clients built from it.

use anyhow::Context;
use kiln_proto::v1::sweep_service_client::SweepServiceClient;
use tonic::transport::{Channel, Endpoint};

/// Default coordinator address.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7450";

/// Where the coordinator is.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// Coordinator URL, e.g. http://192.168.1.10:7450.
    #[arg(long, global = true, env = "KILN_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
}

impl Conn {
    /// A channel to the coordinator (fails fast with the URL in the message).
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let url = if self.coordinator.contains("://") {
            self.coordinator.clone()
        } else {
            format!("http://{}", self.coordinator)
        };
        Endpoint::from_shared(url.clone())
            .with_context(|| format!("coordinator URL {url:?}"))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to the coordinator at {url}"))
    }

    /// The sweep service client.
    pub async fn sweeps(&self) -> anyhow::Result<SweepServiceClient<Channel>> {
        Ok(SweepServiceClient::new(self.channel().await?)
            .max_decoding_message_size(64 * 1024 * 1024))
    }
}

/// Turns a gRPC status into an error that reads well on a terminal.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}
