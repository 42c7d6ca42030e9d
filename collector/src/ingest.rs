//! The gRPC service every sidecar VM streams to: `Hello` first, then batches,
//! each acknowledged only after the store committed it.

use std::sync::Arc;

use dialguard_proto::v1::collector_server::Collector;
use dialguard_proto::v1::{
    Ack, CollectorMessage, Hello, SidecarMessage, collector_message, sidecar_message,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::alert::AlertSink;
use crate::event::{EventError, ValidEvent};
use crate::store::{Batch, StoreError, Writer};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the first message of a stream must be `hello`")]
    HelloFirst,
    #[error("hello.{0}: required, empty")]
    HelloField(&'static str),
    #[error("`hello` may only be sent once per stream")]
    SecondHello,
    #[error("message has no `kind`: expected `hello` or `batch`")]
    EmptyMessage,
    #[error(transparent)]
    Event(#[from] EventError),
    #[error("storing the batch failed: {0}")]
    Store(#[from] StoreError),
    #[error("the collector is shutting down")]
    ShuttingDown,
}

impl From<IngestError> for Status {
    fn from(err: IngestError) -> Self {
        let message = err.to_string();
        match err {
            IngestError::Store(_) => Status::internal(message),
            IngestError::ShuttingDown => Status::unavailable(message),
            _ => Status::invalid_argument(message),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CollectorService {
    writer: Writer,
    alerts: AlertSink,
    shutdown: watch::Receiver<bool>,
}

impl CollectorService {
    pub fn new(writer: Writer, alerts: AlertSink, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            writer,
            alerts,
            shutdown,
        }
    }
}

type Outbound = mpsc::Sender<Result<CollectorMessage, Status>>;

#[tonic::async_trait]
impl Collector for CollectorService {
    type ReportStream = ReceiverStream<Result<CollectorMessage, Status>>;

    async fn report(
        &self,
        request: Request<Streaming<SidecarMessage>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let service = self.clone();
        tokio::spawn(async move {
            if let Err(err) = service.serve_stream(inbound, &tx).await {
                tracing::warn!("stream ended: {err}");
                let _ = tx.send(Err(err.into())).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl CollectorService {
    async fn next(
        &mut self,
        inbound: &mut Streaming<SidecarMessage>,
    ) -> Result<Option<sidecar_message::Kind>, Result<IngestError, Status>> {
        let message = tokio::select! {
            message = inbound.message() => message.map_err(Err)?,
            _ = self.shutdown.wait_for(|stop| *stop) => return Err(Ok(IngestError::ShuttingDown)),
        };
        match message {
            None => Ok(None),
            Some(SidecarMessage { kind: None }) => Err(Ok(IngestError::EmptyMessage)),
            Some(SidecarMessage { kind: Some(kind) }) => Ok(Some(kind)),
        }
    }

    async fn serve_stream(
        mut self,
        mut inbound: Streaming<SidecarMessage>,
        tx: &Outbound,
    ) -> Result<(), IngestError> {
        let hello = match self.next(&mut inbound).await {
            Ok(Some(sidecar_message::Kind::Hello(hello))) => Arc::new(validate_hello(hello)?),
            Ok(Some(_)) => return Err(IngestError::HelloFirst),
            Ok(None) => return Ok(()),
            Err(Err(status)) => {
                tracing::debug!("stream broken before hello: {status}");
                return Ok(());
            }
            Err(Ok(err)) => return Err(err),
        };
        tracing::info!(node = %hello.node_id, vm = %hello.vm_instance, "sidecar connected");
        loop {
            let batch = match self.next(&mut inbound).await {
                Ok(Some(sidecar_message::Kind::Batch(batch))) => batch,
                Ok(Some(sidecar_message::Kind::Hello(_))) => return Err(IngestError::SecondHello),
                Ok(None) => return Ok(()),
                // Transport errors: the sidecar went away; nothing to answer.
                Err(Err(status)) => {
                    tracing::debug!(node = %hello.node_id, "stream broken: {status}");
                    return Ok(());
                }
                Err(Ok(err)) => return Err(err),
            };
            let through = batch.events.iter().map(|e| e.sequence).max().unwrap_or(0);
            let events = batch
                .events
                .into_iter()
                .enumerate()
                .map(|(index, raw)| ValidEvent::validate(index, raw))
                .collect::<Result<Vec<_>, _>>()?;
            let committed = self
                .writer
                .commit(Batch {
                    sidecar: Arc::clone(&hello),
                    events,
                    dropped_total: batch.dropped_total,
                    received_ns: crate::time::now_unix_nanos(),
                })
                .await?;
            self.alerts.misrouted(&hello, &committed.new_events);
            let ack = CollectorMessage {
                kind: Some(collector_message::Kind::Ack(Ack {
                    through_sequence: through,
                })),
            };
            // A sidecar that stops reading acks must not hold up shutdown.
            tokio::select! {
                sent = tx.send(Ok(ack)) => if sent.is_err() { return Ok(()) },
                _ = self.shutdown.wait_for(|stop| *stop) => return Err(IngestError::ShuttingDown),
            }
        }
    }
}

fn validate_hello(hello: Hello) -> Result<Hello, IngestError> {
    if hello.node_id.is_empty() {
        return Err(IngestError::HelloField("node_id"));
    }
    if hello.vm_instance.is_empty() {
        return Err(IngestError::HelloField("vm_instance"));
    }
    Ok(hello)
}
