//! The gRPC service every sidecar VM streams to: `Hello` first, then batches
//! and heartbeats; each batch acknowledged only after the store committed
//! it. Invalid events are refused one by one (named in the ack); invalid
//! streams (a bad hello, a heartbeat whose counters went back, a flood) end
//! with a status.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dialguard_proto::limits;

use dialguard_proto::v1::collector_server::Collector;
use dialguard_proto::v1::{
    Ack, Build, CollectorMessage, ConnectionEvent, EventBatch, Heartbeat, Hello, Mode, Rejection,
    SidecarMessage, Verdict, collector_message, sidecar_message,
};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::alert::AlertSink;
use crate::alertmanager::AlertmanagerSink;
use crate::directory::Directory;
use crate::event::{EventError, TimeWindow, ValidEvent};
use crate::finding::{self, Cause};
use crate::identity::{IdentityError, PeerIdentity};
use crate::inventory::{INTERVAL_RANGE_MS, Inventory, InventoryError, VmKey};
use crate::listener::{ClientCertificate, PeerInfo};
use crate::metrics::Metrics;
use crate::store::{Batch, Committed, PendingCommit, StoreError, Writer};

/// What one stream, and the server as a whole, may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest encoded message (`RESOURCE_EXHAUSTED`/`OUT_OF_RANGE` from tonic beyond it).
    pub max_message_bytes: usize,
    /// Most events in one batch (`INVALID_ARGUMENT` beyond it).
    pub max_batch_events: usize,
    /// Most streams open at once (`RESOURCE_EXHAUSTED` for the next one).
    pub max_streams: usize,
    /// How long a new stream has to send its `hello` (`DEADLINE_EXCEEDED`).
    pub hello_timeout: Duration,
    /// Most sidecar VMs in the inventory (`RESOURCE_EXHAUSTED` for a new one).
    pub max_vms: usize,
    /// Events older than this are refused in the ack (`serve` makes it no
    /// longer than `--retention`: an older event would expire at once).
    pub max_event_age: Duration,
    /// Events stamped further ahead of the collector's clock than this are
    /// refused in the ack.
    pub max_clock_skew: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            max_batch_events: 10_000,
            max_streams: 20_000,
            hello_timeout: Duration::from_secs(10),
            max_vms: crate::inventory::DEFAULT_MAX_VMS,
            max_event_age: crate::DEFAULT_RETENTION,
            max_clock_skew: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the first message of a stream must be `hello`")]
    HelloFirst,
    #[error("no `hello` within {0:?} of opening the stream")]
    NoHello(Duration),
    #[error("hello.{0}: required, empty")]
    HelloField(&'static str),
    #[error("hello.{field}: {value}, expected {expected}")]
    HelloValue {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("hello.{field}: {bytes} bytes, expected at most {max}")]
    HelloTooLong {
        field: &'static str,
        bytes: usize,
        max: usize,
    },
    #[error("hello.instance_ips: {count} addresses, expected at most {max}")]
    TooManyInstanceIps { count: usize, max: usize },
    #[error("hello.instance_ips[{index}]: {value:?}, expected an IPv4 or IPv6 address")]
    InstanceIp { index: usize, value: String },
    #[error("a message could not be decoded as a SidecarMessage: {0}")]
    Undecodable(String),
    #[error("{0}")]
    MessageTooLarge(String),
    #[error(
        "more than {EMPTY_BATCHES_PER_SECOND} empty batches in one second: \
         an empty batch carries nothing (heartbeats say a VM is alive)"
    )]
    EmptyBatchFlood,
    #[error("`hello` may only be sent once per stream")]
    SecondHello,
    #[error("message has no `kind`: expected `hello`, `batch` or `heartbeat`")]
    EmptyMessage,
    #[error("batch.events: {events} events, expected at most {max} per batch")]
    BatchTooLarge { events: usize, max: usize },
    #[error("the collector serves at most {0} streams at once; retry later")]
    TooManyStreams(usize),
    #[error("storing the batch failed: {0}")]
    Store(#[from] StoreError),
    #[error("the collector is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(
        "hello.namespace {claimed:?} does not match namespace {proven:?} of the client \
         certificate ({identity})"
    )]
    IdentityMismatch {
        claimed: String,
        proven: String,
        identity: String,
    },
    /// `--grpc-client-ca`: the verified certificate proves no workload identity.
    #[error(transparent)]
    NoIdentity(#[from] IdentityError),
}

impl From<IngestError> for Status {
    fn from(err: IngestError) -> Self {
        let message = err.to_string();
        match err {
            IngestError::Store(_) => Status::internal(message),
            IngestError::ShuttingDown => Status::unavailable(message),
            IngestError::TooManyStreams(_)
            | IngestError::MessageTooLarge(_)
            | IngestError::EmptyBatchFlood
            | IngestError::Inventory(InventoryError::Full(_) | InventoryError::Flood(_)) => {
                Status::resource_exhausted(message)
            }
            IngestError::NoHello(_) => Status::deadline_exceeded(message),
            IngestError::IdentityMismatch { .. } | IngestError::NoIdentity(_) => {
                Status::permission_denied(message)
            }
            IngestError::HelloFirst
            | IngestError::HelloField(_)
            | IngestError::HelloValue { .. }
            | IngestError::HelloTooLong { .. }
            | IngestError::TooManyInstanceIps { .. }
            | IngestError::InstanceIp { .. }
            | IngestError::Undecodable(_)
            | IngestError::SecondHello
            | IngestError::EmptyMessage
            | IngestError::BatchTooLarge { .. }
            | IngestError::Inventory(
                InventoryError::Backwards { .. } | InventoryError::ExpectedNamespace { .. },
            ) => Status::invalid_argument(message),
        }
    }
}

/// Everyone told about newly stored reported connections.
#[derive(Debug, Clone)]
pub struct Notify {
    pub alerts: AlertSink,
    pub alertmanager: Option<AlertmanagerSink>,
    pub directory: Directory,
    /// Every VM's identity and counters (coverage).
    pub inventory: Inventory,
}

#[derive(Debug, Clone)]
pub struct CollectorService {
    writer: Writer,
    notify: Notify,
    shutdown: watch::Receiver<bool>,
    limits: Limits,
    streams: Arc<Semaphore>,
    /// The budget of [`QUEUED_EVENTS`].
    queued_events: Arc<Semaphore>,
    metrics: Metrics,
}

impl CollectorService {
    pub fn new(
        writer: Writer,
        notify: Notify,
        limits: Limits,
        metrics: Metrics,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            writer,
            notify,
            shutdown,
            limits,
            metrics,
            streams: Arc::new(Semaphore::new(limits.max_streams)),
            queued_events: Arc::new(Semaphore::new(QUEUED_EVENTS)),
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
        let identity = peer_identity(&request).inspect_err(|err| {
            tracing::warn!("stream refused: {err}");
            self.metrics.refuse_stream(err.reason());
        })?;
        let permit = Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            let err = IngestError::TooManyStreams(self.limits.max_streams);
            self.metrics.refuse_stream(err.reason());
            err
        })?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let service = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let metrics = service.metrics.clone();
            let mut inbound = inbound;
            let client = identity.as_ref().map(|id| id.uri.clone());
            if let Err(err) = service.serve_stream(&mut inbound, &tx, identity).await {
                tracing::warn!(client, "stream ended: {err}");
                metrics.refuse_stream(err.reason());
                let shutting_down = matches!(err, IngestError::ShuttingDown);
                let _ = tx.send(Err(err.into())).await;
                if shutting_down {
                    linger(&mut inbound).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What the inbound side of a stream yielded.
enum Next {
    Message(Box<sidecar_message::Kind>),
    /// The sidecar closed its side cleanly.
    End,
    /// The transport broke (the sidecar went away); nothing to answer.
    Broken(Status),
}

impl CollectorService {
    async fn next(&mut self, inbound: &mut Streaming<SidecarMessage>) -> Result<Next, IngestError> {
        let message = tokio::select! {
            message = inbound.message() => message,
            _ = self.shutdown.wait_for(|stop| *stop) => return Err(IngestError::ShuttingDown),
        };
        match message {
            Err(status) => match refusal(&status) {
                Some(err) => Err(err),
                None => Ok(Next::Broken(status)),
            },
            Ok(None) => Ok(Next::End),
            Ok(Some(SidecarMessage { kind: None })) => Err(IngestError::EmptyMessage),
            Ok(Some(SidecarMessage { kind: Some(kind) })) => Ok(Next::Message(Box::new(kind))),
        }
    }

    async fn serve_stream(
        mut self,
        inbound: &mut Streaming<SidecarMessage>,
        tx: &Outbound,
        identity: Option<Arc<PeerIdentity>>,
    ) -> Result<(), IngestError> {
        let first = tokio::time::timeout(self.limits.hello_timeout, self.next(inbound))
            .await
            .map_err(|_| IngestError::NoHello(self.limits.hello_timeout))??;
        let hello = match first {
            Next::Message(kind) => match *kind {
                sidecar_message::Kind::Hello(hello) => {
                    let hello = validate_hello(hello)?;
                    check_identity(&hello, identity.as_deref())?;
                    Arc::new(hello)
                }
                sidecar_message::Kind::Batch(_) | sidecar_message::Kind::Heartbeat(_) => {
                    return Err(IngestError::HelloFirst);
                }
            },
            Next::End => return Ok(()),
            Next::Broken(status) => {
                // A status from the transport itself (an oversized or
                // undecodable message) goes back to the sidecar as it is.
                tracing::debug!("stream broken before hello: {status}");
                let _ = tx.send(Err(status)).await;
                return Ok(());
            }
        };
        // Thousands of these a second (every VM's heartbeat stream): debug.
        tracing::debug!(node = %hello.node_id, vm = %hello.vm_instance, "sidecar connected");
        // The key includes what the certificate proved: a certificate of
        // one service account cannot write into, or blind, another's VMs.
        let peer = identity.as_ref().map_or("", |id| id.uri.as_str());
        let vm = VmKey::proven(&hello, peer);
        self.notify
            .inventory
            .hello(&vm, &hello, crate::time::now_unix_nanos())?;
        self.notify.directory.record(&hello);
        self.writer
            .note_seen(Arc::clone(&hello), crate::time::now_unix_nanos())
            .await?;
        self.metrics.streams_connected.inc();
        let result = self
            .serve_batches(&hello, &vm, identity.as_ref(), inbound, tx)
            .await;
        self.metrics.streams_connected.dec();
        self.notify
            .inventory
            .touch(&vm, crate::time::now_unix_nanos());
        // The directory remembers when the pod was last connected (queued,
        // as at hello: nobody needs to wait for it).
        let _ = self
            .writer
            .note_seen(Arc::clone(&hello), crate::time::now_unix_nanos())
            .await;
        result
    }

    async fn serve_batches(
        &mut self,
        hello: &Arc<Hello>,
        vm: &VmKey,
        identity: Option<&Arc<PeerIdentity>>,
        inbound: &mut Streaming<SidecarMessage>,
        tx: &Outbound,
    ) -> Result<(), IngestError> {
        // Batches of this stream queued for commit, oldest first: the next
        // batch is read and validated while earlier ones commit, and acks
        // still go out in order, each after its own commit.
        let mut pipeline: VecDeque<InFlight> = VecDeque::new();
        let result = self.pump(hello, vm, inbound, tx, &mut pipeline).await;
        if let Err(err) = &result {
            tracing::debug!(
                node = %hello.node_id,
                client = identity.map(|id| id.uri.as_str()),
                "stream failing: {err}"
            );
            // Shutting down, or a bad message: what was already queued is
            // committed anyway, so it is acknowledged before the stream ends.
            let _ = self.drain(hello, &mut pipeline, tx).await;
        }
        result
    }

    /// Reads, queues and acknowledges batches until the stream ends.
    async fn pump(
        &mut self,
        hello: &Arc<Hello>,
        vm: &VmKey,
        inbound: &mut Streaming<SidecarMessage>,
        tx: &Outbound,
        pipeline: &mut VecDeque<InFlight>,
    ) -> Result<(), IngestError> {
        let mut in_flight_events = 0usize;
        let mut order = StreamOrder::default();
        loop {
            let room = pipeline.len() < PIPELINE_BATCHES && in_flight_events < PIPELINE_EVENTS;
            let step = tokio::select! {
                biased;
                committed = oldest(pipeline), if !pipeline.is_empty() => Step::Committed(committed),
                next = self.next(inbound), if room => Step::Received(next?),
            };
            match step {
                Step::Committed(committed) => {
                    let Some(done) = pipeline.pop_front() else {
                        continue;
                    };
                    in_flight_events -= done.events;
                    if !self.acknowledge(hello, done, committed?, tx).await? {
                        return Ok(());
                    }
                }
                Step::Received(Next::Message(kind)) => match *kind {
                    sidecar_message::Kind::Batch(batch) => {
                        let dropped = self.notify.inventory.batch(
                            vm,
                            batch.dropped_total,
                            crate::time::now_unix_nanos(),
                        );
                        self.metrics.sidecar_dropped_events.inc_by(dropped);
                        let in_flight = self.submit(hello, vm, batch, &mut order).await?;
                        in_flight_events += in_flight.events;
                        pipeline.push_back(in_flight);
                    }
                    sidecar_message::Kind::Hello(_) => return Err(IngestError::SecondHello),
                    sidecar_message::Kind::Heartbeat(heartbeat) => {
                        self.heartbeat(hello, vm, &heartbeat)?;
                    }
                },
                Step::Received(Next::End) => {
                    // Every batch received is acknowledged before the stream closes.
                    return self.drain(hello, pipeline, tx).await;
                }
                Step::Received(Next::Broken(status)) => {
                    // The batches already queued still commit; nobody is left to ack.
                    tracing::debug!(node = %hello.node_id, "stream broken: {status}");
                    let _ = tx.send(Err(status)).await;
                    return Ok(());
                }
            }
        }
    }

    /// Waits for every queued batch's commit and acknowledges each, in order.
    async fn drain(
        &mut self,
        hello: &Hello,
        pipeline: &mut VecDeque<InFlight>,
        tx: &Outbound,
    ) -> Result<(), IngestError> {
        while let Some(mut done) = pipeline.pop_front() {
            let committed = (&mut done.commit).await?;
            if !self.acknowledge(hello, done, committed, tx).await? {
                break;
            }
        }
        Ok(())
    }

    /// Validates a batch and queues it for commit with its share of the budget.
    async fn submit(
        &self,
        hello: &Arc<Hello>,
        vm: &VmKey,
        batch: EventBatch,
        order: &mut StreamOrder,
    ) -> Result<InFlight, IngestError> {
        if batch.events.len() > self.limits.max_batch_events {
            return Err(IngestError::BatchTooLarge {
                events: batch.events.len(),
                max: self.limits.max_batch_events,
            });
        }
        if batch.events.is_empty() {
            // Nothing to store (its dropped count is in the inventory): acked
            // in turn without the store, and only a few a second.
            order.empty_batch()?;
            return Ok(InFlight {
                commit: PendingCommit::ready(Committed::default()),
                through: order.high,
                rejected: Vec::new(),
                valid: 0,
                events: 0,
            });
        }
        let events = batch.events.len();
        self.metrics.events_received.inc_by(events as u64);
        let window = TimeWindow::around(
            crate::time::now_unix_nanos(),
            self.limits.max_event_age,
            self.limits.max_clock_skew,
        );
        let (mut valid, rejected) =
            validate_events(batch.events, window, &mut order.high, &self.metrics);
        // Cumulative and never backwards: the highest sequence this stream sent.
        let through = order.high;
        judge(&mut valid, hello, &self.notify.directory);
        if let Some(first) = rejected.first() {
            tracing::warn!(
                node = %hello.node_id,
                vm = %hello.vm_instance,
                "refused {} events of a batch, e.g. sequence {}: {}",
                rejected.len(),
                first.sequence,
                first.message
            );
        }
        let valid_count = valid.len() as u64;
        // Waits while QUEUED_EVENTS decoded events of all streams wait for
        // the store; the store gives the permits back after the commit.
        let wanted = u32::try_from(events.clamp(1, QUEUED_EVENTS)).unwrap_or(u32::MAX);
        let mut shutdown = self.shutdown.clone();
        let budget = tokio::select! {
            permit = Arc::clone(&self.queued_events).acquire_many_owned(wanted) => permit.ok(),
            _ = shutdown.wait_for(|stop| *stop) => return Err(IngestError::ShuttingDown),
        };
        let commit = self
            .writer
            .submit(Batch {
                sidecar: Arc::clone(hello),
                peer: Arc::from(&*vm.peer),
                events: valid,
                rejected: rejected.len() as u64,
                dropped_total: batch.dropped_total,
                received_ns: crate::time::now_unix_nanos(),
                budget,
            })
            .await?;
        Ok(InFlight {
            commit,
            through,
            rejected,
            valid: valid_count,
            events,
        })
    }

    /// Tells everyone about a committed batch and acks it; false when the
    /// sidecar no longer reads acks.
    async fn acknowledge(
        &mut self,
        hello: &Hello,
        done: InFlight,
        committed: Committed,
        tx: &Outbound,
    ) -> Result<bool, IngestError> {
        let mut rejected = done.rejected;
        if let Some(first) = committed.rejected.first() {
            tracing::warn!(
                node = %hello.node_id,
                vm = %hello.vm_instance,
                "refused {} events at commit, e.g. sequence {}: {}",
                committed.rejected.len(),
                first.sequence,
                first.message
            );
            for _ in &committed.rejected {
                self.metrics.reject_event("sequence");
            }
        }
        let refused_at_commit = committed.rejected.len() as u64;
        rejected.extend(committed.rejected);
        self.count_stored(
            hello,
            done.valid.saturating_sub(refused_at_commit),
            &committed.new_events,
        );
        self.notify.alerts.misrouted(hello, &committed.new_events);
        if let Some(alertmanager) = &self.notify.alertmanager {
            alertmanager.observe(hello, &committed.new_events, &self.notify.directory);
        }
        let ack = CollectorMessage {
            kind: Some(collector_message::Kind::Ack(Ack {
                through_sequence: done.through,
                rejected,
            })),
        };
        // Acks go out also while shutting down; only a sidecar that stops
        // reading them (a full channel) must not hold shutdown up.
        tokio::select! {
            biased;
            sent = tx.send(Ok(ack)) => Ok(sent.is_ok()),
            _ = self.shutdown.wait_for(|stop| *stop) => Err(IngestError::ShuttingDown),
        }
    }
}

/// What tonic's decoder reported about the sidecar's message, as the
/// sidecar's fault (a refused stream, counted) rather than a broken
/// transport. tonic gives INTERNAL for a message that does not decode,
/// where the fault is the client's: INVALID_ARGUMENT says so.
fn refusal(status: &Status) -> Option<IngestError> {
    let message = status.message();
    match status.code() {
        Code::Internal
            if message.starts_with("failed to decode Protobuf message")
                || message.starts_with("protocol error") =>
        {
            Some(IngestError::Undecodable(message.to_owned()))
        }
        Code::OutOfRange | Code::ResourceExhausted
            if message.contains("too large") || message.contains("size limit") =>
        {
            Some(IngestError::MessageTooLarge(message.to_owned()))
        }
        _ => None,
    }
}

/// How long a stream told that the collector is shutting down keeps reading
/// (and discarding) what the sidecar still sends.
const LINGER: Duration = Duration::from_secs(2);

/// Reads the inbound side until the sidecar ends it, for at most [`LINGER`].
///
/// On shutdown the connection closes as soon as its last stream ends. A
/// sidecar still sending batches into a closed socket gets a TCP reset,
/// and its kernel may drop the final acks and status it had not read yet;
/// so the stream stays open until the sidecar, having read the status,
/// ends its side. What it sends meanwhile was never acknowledged and will
/// be sent again.
async fn linger(inbound: &mut Streaming<SidecarMessage>) {
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(Some(_)) = inbound.message().await {}
    })
    .await;
}

/// Decoded events queued for the store, over all streams (about 1 KiB each
/// in memory): beyond this, a stream waits with its decoded batch before
/// queueing it (and reads no further).
pub const QUEUED_EVENTS: usize = 131_072;
/// Most batches of one stream queued for commit at once.
const PIPELINE_BATCHES: usize = 32;
/// Most events of one stream queued for commit at once (bounds memory per
/// stream; one batch of any allowed size is always accepted).
const PIPELINE_EVENTS: usize = 16_384;

/// Most empty batches a stream may send in one second; the filter never
/// sends one.
const EMPTY_BATCHES_PER_SECOND: u32 = 10;

/// What one stream has sent so far.
#[derive(Debug)]
struct StreamOrder {
    /// The highest sequence sent on this stream (what its acks are through).
    high: u64,
    empty_window: Instant,
    empty_in_window: u32,
}

impl Default for StreamOrder {
    fn default() -> Self {
        Self {
            high: 0,
            empty_window: Instant::now(),
            empty_in_window: 0,
        }
    }
}

impl StreamOrder {
    fn empty_batch(&mut self) -> Result<(), IngestError> {
        if self.empty_window.elapsed() >= Duration::from_secs(1) {
            self.empty_window = Instant::now();
            self.empty_in_window = 0;
        }
        self.empty_in_window += 1;
        if self.empty_in_window > EMPTY_BATCHES_PER_SECOND {
            return Err(IngestError::EmptyBatchFlood);
        }
        Ok(())
    }
}

/// A batch of a stream between submit and ack.
struct InFlight {
    commit: PendingCommit,
    through: u64,
    rejected: Vec<Rejection>,
    valid: u64,
    events: usize,
}

enum Step {
    Committed(Result<Committed, StoreError>),
    Received(Next),
}

/// The oldest batch's commit (the pipeline is not empty when polled).
async fn oldest(pipeline: &mut VecDeque<InFlight>) -> Result<Committed, StoreError> {
    match pipeline.front_mut() {
        Some(in_flight) => (&mut in_flight.commit).await,
        None => std::future::pending().await,
    }
}

impl CollectorService {
    /// Checks a heartbeat against what the VM reported before and records
    /// it; a refused one ends the stream and changes nothing.
    fn heartbeat(
        &self,
        hello: &Hello,
        vm: &VmKey,
        heartbeat: &Heartbeat,
    ) -> Result<(), IngestError> {
        let increase =
            self.notify
                .inventory
                .heartbeat(vm, hello, heartbeat, crate::time::now_unix_nanos())?;
        self.metrics.heartbeats.inc();
        self.metrics.judged(&hello.namespace, &increase.judged);
        self.metrics.sidecar_dropped_events.inc_by(increase.dropped);
        Ok(())
    }

    fn count_stored(&self, hello: &Hello, valid: u64, new_events: &[ValidEvent]) {
        let new = new_events.len() as u64;
        self.metrics.events_stored.inc_by(new);
        self.metrics
            .events_duplicate
            .inc_by(valid.saturating_sub(new));
        // Summed per label set first: the metric's labels are owned
        // strings, so one increment per set, not per event (batches of
        // hundreds of events mostly share a handful of sets).
        let mut sets: HashMap<(&'static str, u16, Cause), u64, foldhash::fast::RandomState> =
            HashMap::default();
        let mut would_close = 0;
        for event in new_events {
            let key = (
                event.verdict.label(),
                event.original_destination.port(),
                event.cause,
            );
            *sets.entry(key).or_default() += 1;
            would_close += u64::from(event.raw.would_close);
        }
        for ((verdict, port, cause), connections) in sets {
            self.metrics
                .misrouted(&hello.namespace, verdict, port, cause, connections);
        }
        self.metrics.would_close(&hello.namespace, would_close);
    }
}

impl IngestError {
    /// Every value of [`IngestError::reason`].
    pub const REASONS: [&str; 14] = [
        "invalid_hello",
        "undecodable",
        "message_too_large",
        "empty_batch_flood",
        "no_hello",
        "batch_too_large",
        "too_many_streams",
        "store_error",
        "shutting_down",
        "too_many_vms",
        "heartbeat_backwards",
        "heartbeat_flood",
        "identity_mismatch",
        "no_identity",
    ];

    /// The `reason` label of `dialguard_streams_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::HelloFirst
            | IngestError::HelloField(_)
            | IngestError::HelloValue { .. }
            | IngestError::HelloTooLong { .. }
            | IngestError::TooManyInstanceIps { .. }
            | IngestError::InstanceIp { .. }
            | IngestError::SecondHello
            | IngestError::EmptyMessage
            | IngestError::Inventory(InventoryError::ExpectedNamespace { .. }) => "invalid_hello",
            IngestError::Undecodable(_) => "undecodable",
            IngestError::MessageTooLarge(_) => "message_too_large",
            IngestError::EmptyBatchFlood => "empty_batch_flood",
            IngestError::Inventory(InventoryError::Full(_)) => "too_many_vms",
            IngestError::Inventory(InventoryError::Backwards { .. }) => "heartbeat_backwards",
            IngestError::Inventory(InventoryError::Flood(_)) => "heartbeat_flood",
            IngestError::NoHello(_) => "no_hello",
            IngestError::BatchTooLarge { .. } => "batch_too_large",
            IngestError::TooManyStreams(_) => "too_many_streams",
            IngestError::Store(_) => "store_error",
            IngestError::ShuttingDown => "shutting_down",
            IngestError::IdentityMismatch { .. } => "identity_mismatch",
            IngestError::NoIdentity(_) => "no_identity",
        }
    }
}

/// Splits a batch into the events to store and the ones refused, each
/// refusal naming the field and what was expected. One bad event never costs
/// the others of its batch.
///
/// Sequences must rise within a stream (`stream_high` is the highest seen on
/// it so far, and moves up): a resend starts on a new stream, so a sequence
/// at or below one already sent on this stream is refused, not taken for a
/// duplicate.
fn validate_events(
    raw: Vec<ConnectionEvent>,
    window: TimeWindow,
    stream_high: &mut u64,
    metrics: &Metrics,
) -> (Vec<ValidEvent>, Vec<Rejection>) {
    let mut events = Vec::with_capacity(raw.len());
    let mut rejected = Vec::new();
    for (index, event) in raw.into_iter().enumerate() {
        let sequence = event.sequence;
        let checked = if (1..=limits::MAX_SEQUENCE).contains(&sequence) && sequence <= *stream_high
        {
            Err(EventError {
                index,
                field: "sequence",
                message: format!(
                    "{sequence} is not above {}, already sent on this stream: \
                     sequences rise within a stream (a resend starts a new stream)",
                    *stream_high
                ),
            })
        } else {
            let checked = ValidEvent::validate(index, event, window);
            // An event refused for another field still used its sequence.
            if !matches!(&checked, Err(err) if err.field == "sequence") {
                *stream_high = sequence;
            }
            checked
        };
        match checked {
            Ok(event) => events.push(event),
            Err(err) => rejected.push({
                metrics.reject_event(err.field);
                Rejection {
                    sequence,
                    code: Code::InvalidArgument as i32,
                    message: err.to_string(),
                }
            }),
        }
    }
    (events, rejected)
}

/// Settles each event's verdict and cause, once, before it is stored.
///
/// The filter can only tell a pod IP by `podCidrs`; when they are not set
/// (or incomplete) a pod dialed and reached elsewhere arrives REDIRECTED.
/// What decides is whether the dialed address belongs to the mesh: an
/// address the directory knows as a pod makes it MISROUTED (stored,
/// counted, alerted and reported as such; `would_close` stays as the
/// filter sent it, false: the filter was not certain).
fn judge(events: &mut [ValidEvent], hello: &Hello, directory: &Directory) {
    for event in events {
        if event.verdict == Verdict::Redirected && directory.is_pod(event.original_destination.ip())
        {
            event.verdict = Verdict::Misrouted;
            event.raw.verdict = Verdict::Misrouted as i32;
        }
        let raw = &event.raw;
        event.cause = finding::classify(&finding::Facts {
            verdict: event.verdict,
            cluster: &raw.cluster_name,
            filter_chain: &raw.filter_chain_name,
            response_flags: raw.response_flags,
            dialed: event.original_destination,
            upstream: event.upstream_host,
            source: event.source,
            instance_ips: &hello.instance_ips,
        });
    }
}

/// What the client certificate proves about the stream's client, if the
/// connection had one (`--grpc-client-ca`); refused when it proves nothing.
fn peer_identity(
    request: &Request<Streaming<SidecarMessage>>,
) -> Result<Option<Arc<PeerIdentity>>, IngestError> {
    match request
        .extensions()
        .get::<PeerInfo>()
        .map(|peer| &peer.client)
    {
        Some(ClientCertificate::Identity(identity)) => Ok(Some(Arc::clone(identity))),
        Some(ClientCertificate::Unusable(err)) => Err(IngestError::NoIdentity(err.clone())),
        Some(ClientCertificate::None) | None => Ok(None),
    }
}

/// A hello speaks only for the namespace its client certificate proves:
/// a certificate from the CA must not let one workload claim another's
/// sidecar (and, with a high sequence, blind it).
fn check_identity(hello: &Hello, identity: Option<&PeerIdentity>) -> Result<(), IngestError> {
    match identity {
        Some(identity) if identity.namespace != hello.namespace => {
            Err(IngestError::IdentityMismatch {
                claimed: hello.namespace.chars().take(80).collect(),
                proven: identity.namespace.clone(),
                identity: identity.uri.clone(),
            })
        }
        _ => Ok(()),
    }
}

fn validate_hello(hello: Hello) -> Result<Hello, IngestError> {
    if hello.node_id.is_empty() {
        return Err(IngestError::HelloField("node_id"));
    }
    if hello.vm_instance.is_empty() {
        return Err(IngestError::HelloField("vm_instance"));
    }
    for (field, value, max) in [
        ("node_id", &hello.node_id, limits::NODE_ID),
        ("vm_instance", &hello.vm_instance, limits::VM_INSTANCE),
        ("pod_name", &hello.pod_name, limits::POD_NAME),
        ("namespace", &hello.namespace, limits::NAMESPACE),
        ("workload_name", &hello.workload_name, limits::WORKLOAD_NAME),
        ("cluster_id", &hello.cluster_id, limits::CLUSTER_ID),
        ("istio_version", &hello.istio_version, limits::VERSION),
        ("filter_version", &hello.filter_version, limits::VERSION),
    ] {
        if value.len() > max {
            return Err(IngestError::HelloTooLong {
                field,
                bytes: value.len(),
                max,
            });
        }
    }
    if hello.instance_ips.len() > limits::INSTANCE_IPS {
        return Err(IngestError::TooManyInstanceIps {
            count: hello.instance_ips.len(),
            max: limits::INSTANCE_IPS,
        });
    }
    for (index, ip) in hello.instance_ips.iter().enumerate() {
        if ip.len() > limits::IP || ip.trim().parse::<IpAddr>().is_err() {
            return Err(IngestError::InstanceIp {
                index,
                value: ip.chars().take(limits::IP + 1).collect(),
            });
        }
    }
    let sha = &hello.module_sha256;
    let hex_digest = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
    if !(sha.is_empty() || hex_digest) {
        return Err(IngestError::HelloValue {
            field: "module_sha256",
            value: format!("{:?}", sha.chars().take(80).collect::<String>()),
            expected: "empty or 64 hex digits",
        });
    }
    if Build::try_from(hello.build).is_err() {
        return Err(IngestError::HelloValue {
            field: "build",
            value: hello.build.to_string(),
            expected: "0 (BUILD_UNSPECIFIED), 1 (BUILD_AUDIT) or 2 (BUILD_ENFORCE)",
        });
    }
    if Mode::try_from(hello.mode).is_err() {
        return Err(IngestError::HelloValue {
            field: "mode",
            value: hello.mode.to_string(),
            expected: "0 (MODE_UNSPECIFIED), 1 (MODE_AUDIT) or 2 (MODE_ENFORCE)",
        });
    }
    let interval = hello.heartbeat_interval_ms;
    if interval != 0 && !INTERVAL_RANGE_MS.contains(&interval) {
        return Err(IngestError::HelloValue {
            field: "heartbeat_interval_ms",
            value: interval.to_string(),
            expected: "0 (a filter that does not heartbeat) or 1000 to 3600000",
        });
    }
    Ok(hello)
}
