//! `kiln.v1.ModelService`: the model registry's adapter. Each handler checks the caller's
//! scope, converts, calls [`Queue`] and converts back; the rules (names, sizes, the registry's
//! bound) are `queue::models`'s. The coordinator never reads a model file: `kiln model add`
//! uploads it to the pool's model storage, which [`ModelApi`] only names.

use kiln_proto::v1 as pb;
use kiln_proto::v1::model_service_server::ModelService;
use tonic::{Request, Response, Status};

use super::auth::principal;
use crate::domain::rows::ModelRow;
use crate::domain::state::{ModelKind, Scope};
use crate::queue::Queue;
use crate::{Error, Result};

/// Where a model file lives under the model storage: this prefix and its sha256.
pub const MODEL_KEY_PREFIX: &str = "models/sha256/";

/// The registry service.
#[derive(Clone, Debug)]
pub struct ModelApi {
    queue: Queue,
}

impl ModelApi {
    /// A service over `queue`, naming its configured model storage
    /// ([`QueueConfig::model_storage`](crate::queue::QueueConfig)).
    pub fn new(queue: Queue) -> Self {
        Self { queue }
    }
}

fn require<T>(request: &Request<T>, needed: Scope) -> Result<()> {
    principal(request)?.require(needed)
}

fn kind_from_wire(kind: i32) -> Result<ModelKind> {
    match pb::ModelKind::try_from(kind) {
        Ok(pb::ModelKind::Unspecified | pb::ModelKind::Checkpoint) => Ok(ModelKind::Checkpoint),
        Ok(pb::ModelKind::Lora) => Ok(ModelKind::Lora),
        Ok(pb::ModelKind::Embedding) => Ok(ModelKind::Embedding),
        Ok(pb::ModelKind::Vae) => Ok(ModelKind::Vae),
        Err(_) => Err(Error::invalid(format!("kind: unknown value {kind}"))),
    }
}

fn model_to_wire(m: ModelRow) -> pb::ModelInfo {
    let kind = match m.kind {
        ModelKind::Checkpoint => pb::ModelKind::Checkpoint,
        ModelKind::Lora => pb::ModelKind::Lora,
        ModelKind::Embedding => pb::ModelKind::Embedding,
        ModelKind::Vae => pb::ModelKind::Vae,
    };
    pb::ModelInfo {
        name: m.name,
        sha256: m.sha256,
        size: m.bytes,
        kind: kind as i32,
        created_at_ms: m.created_at,
        updated_at_ms: m.updated_at,
    }
}

#[tonic::async_trait]
impl ModelService for ModelApi {
    async fn add_model(
        &self,
        request: Request<pb::AddModelRequest>,
    ) -> Result<Response<pb::AddModelResponse>, Status> {
        require(&request, Scope::Submit)?;
        let r = request.into_inner();
        let kind = kind_from_wire(r.kind)?;
        let (model, previous) = self
            .queue
            .add_model(&r.name, &r.sha256, r.size, kind)
            .await?;
        Ok(Response::new(pb::AddModelResponse {
            model: Some(model_to_wire(model)),
            previous_sha256: previous.unwrap_or_default(),
        }))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        require(&request, Scope::Read)?;
        let models = self.queue.models().await?;
        Ok(Response::new(pb::ListModelsResponse {
            models: models.into_iter().map(model_to_wire).collect(),
        }))
    }

    async fn remove_model(
        &self,
        request: Request<pb::RemoveModelRequest>,
    ) -> Result<Response<pb::RemoveModelResponse>, Status> {
        require(&request, Scope::Admin)?;
        let sha256 = self.queue.remove_model(&request.into_inner().name).await?;
        Ok(Response::new(pb::RemoveModelResponse { sha256 }))
    }

    async fn model_storage(
        &self,
        request: Request<pb::ModelStorageRequest>,
    ) -> Result<Response<pb::ModelStorageResponse>, Status> {
        require(&request, Scope::Read)?;
        Ok(Response::new(pb::ModelStorageResponse {
            url: self
                .queue
                .config()
                .model_storage
                .clone()
                .unwrap_or_default(),
            key_prefix: MODEL_KEY_PREFIX.to_string(),
        }))
    }
}
