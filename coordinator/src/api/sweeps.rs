//! `kiln.v1.SweepService`: the client-facing adapter. Each handler converts the request,
//! calls [`Queue`], and converts the answer; no business rules live here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use kiln_proto::v1 as pb;
use kiln_proto::v1::sweep_service_server::SweepService;
use kiln_proto::{SweepId, WorkerId};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::auth::principal;
use super::convert::{self, sweep_id};
use super::pictures::{IMAGE_CHUNK_BYTES, MAX_SWEEP_IMAGES};
use crate::domain::auth::Principal;
use crate::domain::rows::SweepRow;
use crate::domain::state::Scope;
use crate::query::{Filter, parse_sort};
use crate::queue::{Queue, Submission, SubmittedCells, stored_source};
use crate::store::{CellQuery, CellSort};
use crate::sweep::SweepSource;
use crate::{Error, Result};

/// How often a watcher re-reads even without a change (for rate and ETA).
const WATCH_TICK: Duration = Duration::from_secs(2);
/// Changes closer together than this are sent as one progress event.
const WATCH_DEBOUNCE: Duration = Duration::from_millis(200);

/// The caller of `request`, refused unless its token's scope covers `needed`.
fn caller<T>(request: &Request<T>, needed: Scope) -> Result<Principal> {
    let p = principal(request)?;
    p.require(needed)?;
    Ok(p)
}

/// The client service.
#[derive(Clone, Debug)]
pub struct SweepApi {
    queue: Queue,
}

impl SweepApi {
    /// A service over `queue`.
    pub fn new(queue: Queue) -> Self {
        Self { queue }
    }

    /// Sweep `id`, refused (PERMISSION_DENIED) when `caller` may not see it.
    async fn owned(&self, caller: &Principal, id: SweepId) -> Result<SweepRow> {
        let sweep = self.queue.sweep(id).await?;
        caller.may_see(sweep.owner.as_deref())?;
        Ok(sweep)
    }

    /// The sweep a changing request names, refused unless the caller may submit and owns it.
    async fn writable(&self, request: &Request<pb::SweepRequest>) -> Result<SweepId> {
        let who = caller(request, Scope::Submit)?;
        let id = sweep_id(request.get_ref().sweep_id)?;
        self.owned(&who, id).await?;
        Ok(id)
    }

    async fn progress(&self, id: SweepId) -> Result<pb::SweepProgress> {
        let sweep = self.queue.sweep(id).await?;
        let rate = self
            .queue
            .sweep_rate(id, crate::clock::Millis(sweep.created_at))
            .await?;
        let running = self.queue.running(Some(id), None).await?;
        let c = &sweep.counts;
        let remaining = c.available + c.scheduled + c.running + c.retryable + c.held;
        let eta_ms = if remaining == 0 {
            0
        } else if rate > 0.0 {
            (remaining as f64 / rate * 1000.0) as i64
        } else {
            -1
        };
        Ok(pb::SweepProgress {
            sweep: Some(convert::sweep_to_wire(&sweep)),
            cells_per_second: rate,
            eta_ms,
            running: running.iter().map(convert::progress_to_wire).collect(),
        })
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::SweepProgress, Status>> + Send>>;

/// The distinct hashes of a request's `images` map, refused past [`MAX_SWEEP_IMAGES`].
fn images_of(images: &HashMap<String, String>) -> Result<BTreeSet<String>> {
    if images.len() > MAX_SWEEP_IMAGES {
        return Err(too_many_images());
    }
    Ok(images.values().cloned().collect())
}

fn too_many_images() -> Error {
    Error::TooLarge(format!(
        "images: a sweep may name at most {MAX_SWEEP_IMAGES} pictures"
    ))
}

#[tonic::async_trait]
impl SweepService for SweepApi {
    async fn submit_sweep(
        &self,
        request: Request<Streaming<pb::SubmitSweepRequest>>,
    ) -> Result<Response<pb::SubmitSweepResponse>, Status> {
        let owner = caller(&request, Scope::Submit)?.owner;
        let _turn = self.queue.owner_turn(owner.as_deref())?;
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::SubmitSweepRequest {
                part: Some(pb::submit_sweep_request::Part::Header(h)),
            })) => h,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Error::invalid("the first message must be a SweepHeader").into());
            }
        };
        // Cells are taken in message by message, so a stream is never held whole.
        let mut builder = self.queue.intake_builder();
        let mut sent = 0;
        let mut pictures = images_of(&header.images)?;
        // Registry references of sent cells, looked up once per submission.
        let mut pins = BTreeMap::new();
        {
            let named: Vec<&str> = pictures.iter().map(String::as_str).collect();
            self.queue.require_images(&named).await?;
        }
        while let Some(msg) = stream.next().await {
            match msg?.part {
                Some(pb::submit_sweep_request::Part::Cells(chunk)) => {
                    let mut specs = chunk
                        .cells
                        .into_iter()
                        .enumerate()
                        .map(|(i, c)| {
                            convert::cell_from_wire(c)
                                .map_err(|e| Error::invalid(format!("cell {}: {e}", sent + i)))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    // Pictures are checked as their first cell arrives, before it is taken.
                    let mut new: Vec<&str> = Vec::new();
                    for init in specs.iter().filter_map(|s| s.init.as_ref()) {
                        if !pictures.contains(&init.sha256) && !new.contains(&&*init.sha256) {
                            new.push(&init.sha256);
                        }
                    }
                    if pictures.len() + new.len() > MAX_SWEEP_IMAGES {
                        return Err(too_many_images().into());
                    }
                    self.queue.require_images(&new).await?;
                    pictures.extend(new.into_iter().map(str::to_owned));
                    self.queue.pin_cells(&mut specs, &mut pins).await?;
                    let n = specs.len();
                    builder = self.queue.take_cells(builder, specs, sent).await?;
                    sent += n;
                }
                _ => return Err(Error::invalid("only one SweepHeader per stream").into()),
            }
        }
        let mut spec = header.spec;
        let mut cells = SubmittedCells::Taken(builder);
        if sent == 0 && !spec.is_empty() {
            // A sweep file: planned here, cell by cell, before anything is stored.
            let mut src = SweepSource {
                path: header.spec_path,
                text: spec,
                files: header.files.into_iter().collect(),
                images: header.images.into_iter().collect(),
                models: Default::default(),
            };
            self.queue.pin_models(&mut src, &Default::default()).await?;
            spec = stored_source(&src);
            cells = SubmittedCells::File(src);
        }
        let out = self
            .queue
            .submit(Submission {
                name: header.name,
                idempotency_key: header.idempotency_key,
                priority: header.priority,
                max_attempts: match header.max_attempts {
                    0 => None,
                    n => Some(i32::try_from(n).map_err(|_| Error::invalid("max_attempts"))?),
                },
                spec,
                cells,
                owner,
                unique_name: header.unique_name,
            })
            .await?;
        Ok(Response::new(pb::SubmitSweepResponse {
            sweep_id: out.id.0 as u64,
            cell_count: out.cell_count,
            duplicate: out.duplicate,
        }))
    }

    async fn plan_sweep(
        &self,
        request: Request<pb::PlanSweepRequest>,
    ) -> Result<Response<pb::PlanSweepResponse>, Status> {
        // Planning costs CPU and memory: it takes a token that may submit, one at a time.
        let who = caller(&request, Scope::Submit)?;
        let _turn = self.queue.owner_turn(who.owner.as_deref())?;
        let r = request.into_inner();
        images_of(&r.images)?;
        let mut src = SweepSource {
            path: r.spec_path,
            text: r.spec,
            files: r.files.into_iter().collect(),
            images: r.images.into_iter().collect(),
            models: Default::default(),
        };
        self.queue.pin_models(&mut src, &Default::default()).await?;
        let preview = r.preview.min(1000) as usize;
        let plan = self.queue.plan(src, &r.idempotency_key, preview).await?;
        let s = plan.summary;
        Ok(Response::new(pb::PlanSweepResponse {
            name: s.name,
            cell_count: s.cell_count,
            duplicates: s.duplicates,
            axes: s.axes,
            seeds: s.seeds,
            cells: plan
                .cells
                .into_iter()
                .map(|c| convert::cell_to_wire(c.spec))
                .collect(),
        }))
    }

    async fn extend_sweep(
        &self,
        request: Request<pb::ExtendSweepRequest>,
    ) -> Result<Response<pb::ExtendSweepResponse>, Status> {
        let who = caller(&request, Scope::Submit)?;
        let _turn = self.queue.owner_turn(who.owner.as_deref())?;
        let r = request.into_inner();
        self.owned(&who, sweep_id(r.sweep_id)?).await?;
        let pictures = images_of(&r.images)?;
        let pictures: Vec<&str> = pictures.iter().map(String::as_str).collect();
        self.queue.require_images(&pictures).await?;
        let src = SweepSource {
            path: r.spec_path,
            text: r.spec,
            files: r.files.into_iter().collect(),
            images: r.images.into_iter().collect(),
            models: Default::default(),
        };
        let (added, cell_count) = self.queue.extend(sweep_id(r.sweep_id)?, src).await?;
        Ok(Response::new(pb::ExtendSweepResponse { added, cell_count }))
    }

    async fn get_sweep(
        &self,
        request: Request<pb::GetSweepRequest>,
    ) -> Result<Response<pb::Sweep>, Status> {
        let who = caller(&request, Scope::Read)?;
        let s = self
            .owned(&who, sweep_id(request.into_inner().sweep_id)?)
            .await?;
        Ok(Response::new(convert::sweep_to_wire(&s)))
    }

    async fn list_sweeps(
        &self,
        request: Request<pb::ListSweepsRequest>,
    ) -> Result<Response<pb::ListSweepsResponse>, Status> {
        let who = caller(&request, Scope::Read)?;
        let r = request.into_inner();
        let limit = match r.limit {
            0 => 50,
            n => i64::from(n.min(1000)),
        };
        let before = if r.page_token.is_empty() {
            None
        } else {
            let id: i64 = r
                .page_token
                .parse()
                .map_err(|_| Error::invalid("page_token: not from ListSweeps"))?;
            Some(SweepId(id))
        };
        let rows = self.queue.sweeps(limit, before, who.only_owner()).await?;
        let next_page_token = match rows.last() {
            Some(last) if rows.len() as i64 == limit => last.id.0.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListSweepsResponse {
            sweeps: rows.iter().map(convert::sweep_to_wire).collect(),
            next_page_token,
        }))
    }

    async fn cancel_sweep(
        &self,
        request: Request<pb::SweepRequest>,
    ) -> Result<Response<pb::CancelSweepResponse>, Status> {
        let (cancelled, requested) = self.queue.cancel(self.writable(&request).await?).await?;
        Ok(Response::new(pb::CancelSweepResponse {
            cancelled,
            cancel_requested: requested,
        }))
    }

    async fn pause_sweep(
        &self,
        request: Request<pb::SweepRequest>,
    ) -> Result<Response<pb::ChangeCount>, Status> {
        let changed = self.queue.pause(self.writable(&request).await?).await?;
        Ok(Response::new(pb::ChangeCount { changed }))
    }

    async fn resume_sweep(
        &self,
        request: Request<pb::SweepRequest>,
    ) -> Result<Response<pb::ChangeCount>, Status> {
        let changed = self.queue.resume(self.writable(&request).await?).await?;
        Ok(Response::new(pb::ChangeCount { changed }))
    }

    async fn retry_failed(
        &self,
        request: Request<pb::SweepRequest>,
    ) -> Result<Response<pb::ChangeCount>, Status> {
        let changed = self
            .queue
            .retry_failed(self.writable(&request).await?)
            .await?;
        Ok(Response::new(pb::ChangeCount { changed }))
    }

    type WatchSweepStream = WatchStream;

    async fn watch_sweep(
        &self,
        request: Request<pb::SweepRequest>,
    ) -> Result<Response<Self::WatchSweepStream>, Status> {
        let who = caller(&request, Scope::Read)?;
        let id = sweep_id(request.into_inner().sweep_id)?;
        self.owned(&who, id).await?;
        // Fail fast on an unknown sweep, before the stream starts.
        let first = self.progress(id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let api = self.clone();
        let mut changes = self.queue.events().subscribe();
        tokio::spawn(async move {
            let mut next = Ok(first);
            let mut last_sent: Option<pb::SweepProgress> = None;
            loop {
                let done = matches!(&next, Ok(p) if p.sweep.as_ref().is_some_and(|s| s.finished));
                let failed = next.is_err();
                if last_sent.as_ref() != next.as_ref().ok() {
                    last_sent = next.as_ref().ok().cloned();
                    if tx.send(next.map_err(Status::from)).await.is_err() {
                        return; // The client went away.
                    }
                }
                if done || failed {
                    return;
                }
                tokio::select! {
                    _ = changes.changed() => tokio::time::sleep(WATCH_DEBOUNCE).await,
                    _ = tokio::time::sleep(WATCH_TICK) => {}
                    _ = tx.closed() => return,
                }
                next = api.progress(id).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn query_results(
        &self,
        request: Request<pb::QueryResultsRequest>,
    ) -> Result<Response<pb::QueryResultsResponse>, Status> {
        let who = caller(&request, Scope::Read)?;
        let r = request.into_inner();
        let limit = match r.limit {
            0 => 100,
            n => i64::from(n.min(1000)),
        };
        let offset: i64 = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse()
                .ok()
                .filter(|o: &i64| *o >= 0)
                .ok_or_else(|| Error::invalid("page_token: not from QueryResults"))?
        };
        let seed = |v: Option<u64>, name: &str| -> Result<Option<i64>> {
            v.map(|s| i64::try_from(s).map_err(|_| Error::invalid(format!("{name}: past 2^63-1"))))
                .transpose()
        };
        let (filter, located) = if r.filter.trim().is_empty() {
            (None, Vec::new())
        } else {
            let (f, keys) = Filter::parse_located(&r.filter).map_err(Error::from)?;
            (Some(f), keys)
        };
        let q = CellQuery {
            owner: who.only_owner().map(str::to_string),
            sweep: match r.sweep_id {
                0 => None,
                v => Some(sweep_id(v)?),
            },
            states: r
                .states
                .iter()
                .map(|s| convert::cell_state_from_wire(*s))
                .collect::<Result<_>>()?,
            prompt_contains: Some(r.prompt_contains).filter(|s| !s.is_empty()),
            model: Some(r.model).filter(|s| !s.is_empty()),
            seed_min: seed(r.seed_min, "seed_min")?,
            seed_max: seed(r.seed_max, "seed_max")?,
            cfg_min: r.cfg_min.map(f64::from),
            cfg_max: r.cfg_max.map(f64::from),
            worker: match r.worker_id {
                0 => None,
                v => Some(WorkerId::from_wire(v).ok_or_else(|| Error::invalid("worker_id"))?),
            },
            bindings: r.bindings.into_iter().collect(),
            filter,
            sorts: if r.sort_by.trim().is_empty() {
                Vec::new()
            } else {
                parse_sort(&r.sort_by).map_err(Error::from)?
            },
            sort: match pb::ResultSort::try_from(r.sort) {
                Ok(pb::ResultSort::Unspecified | pb::ResultSort::Number) => CellSort::Number,
                Ok(pb::ResultSort::Seed) => CellSort::Seed,
                Ok(pb::ResultSort::Cfg) => CellSort::Cfg,
                Ok(pb::ResultSort::FinishedAt) => CellSort::FinishedAt,
                Err(_) => return Err(Error::invalid("sort: unknown sort key").into()),
            },
            descending: r.descending,
            finished_before: None,
            limit,
            offset,
        };
        if offset == 0 {
            self.queue.check_names(&q, &located).await?;
        }
        let rows = self.queue.query(&q).await?;
        let next_page_token = if rows.len() as i64 == limit {
            (offset + limit).to_string()
        } else {
            String::new()
        };
        let cells = rows
            .into_iter()
            .map(convert::cell_record_to_wire)
            .collect::<Result<_>>()?;
        Ok(Response::new(pb::QueryResultsResponse {
            cells,
            next_page_token,
        }))
    }

    async fn set_keeper(
        &self,
        request: Request<pb::SetKeeperRequest>,
    ) -> Result<Response<pb::CellRecord>, Status> {
        let who = caller(&request, Scope::Submit)?;
        let (id, starred, rating) = convert::keeper_from_wire(request.get_ref())?;
        let sweep = self.queue.cell(id).await?.sweep_id;
        self.owned(&who, sweep).await?;
        let row = self.queue.set_keeper(id, starred, rating).await?;
        Ok(Response::new(convert::cell_record_to_wire(row)?))
    }

    async fn put_image(
        &self,
        request: Request<Streaming<pb::ImageChunk>>,
    ) -> Result<Response<pb::ImageInfo>, Status> {
        let owner = caller(&request, Scope::Submit)?.owner;
        let _turn = self.queue.owner_turn(owner.as_deref())?;
        let mut stream = request.into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?.data;
            if chunk.len() > IMAGE_CHUNK_BYTES {
                return Err(Error::invalid(format!(
                    "PutImage: chunks of at most {IMAGE_CHUNK_BYTES} bytes"
                ))
                .into());
            }
            if data.len() + chunk.len() > kiln_proto::picture::MAX_FILE_BYTES {
                let e = kiln_proto::picture::PictureError::FileTooLarge {
                    bytes: data.len() + chunk.len(),
                };
                return Err(Error::TooLarge(format!("picture: {e}")).into());
            }
            data.extend_from_slice(&chunk);
        }
        let row = self.queue.put_image(data).await?;
        Ok(Response::new(pb::ImageInfo {
            sha256: row.sha256,
            format: row.format,
            width: row.width,
            height: row.height,
            bytes: row.bytes,
        }))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        caller(&request, Scope::Read)?;
        let now = self.queue.now();
        let ttl = self.queue.config().lease_ttl_ms;
        let rows = self.queue.workers().await?;
        let running = self.queue.running(None, None).await?;
        let workers = rows
            .into_iter()
            .map(|w| pb::WorkerRecord {
                worker_id: w.id.0 as u64,
                online: !w.drained && now.0 - w.last_seen_at <= ttl,
                drained: w.drained,
                registered_at_ms: w.registered_at,
                last_seen_at_ms: w.last_seen_at,
                running: running
                    .iter()
                    .filter(|p| p.worker == w.id)
                    .map(convert::progress_to_wire)
                    .collect(),
                cells_per_second: w.completed_recently as f64 / 60.0,
                paused_reason: self.queue.pauses().get(w.id).0,
                control: convert::control_to_wire(self.queue.pauses().get(w.id).1) as i32,
                info: Some(convert::registration_to_wire(w.info)),
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn control_worker(
        &self,
        request: Request<pb::ControlWorkerRequest>,
    ) -> Result<Response<pb::ControlWorkerResponse>, Status> {
        caller(&request, Scope::Admin)?;
        let r = request.into_inner();
        let worker = convert::worker_id(r.worker_id)?;
        let control = convert::control_from_wire(r.control)?;
        self.queue.control_worker(worker, control).await?;
        Ok(Response::new(pb::ControlWorkerResponse {}))
    }
}
