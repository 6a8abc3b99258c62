//! A fault-injecting `ObjectStore` wrapper for tests: errors, latency, hangs,
//! short writes and lost responses on chosen operations (threat plan C1–C4).
//!
//! It wraps a real backend (local files, S3) so a test drives the whole
//! service against storage that misbehaves on cue. Faults are queued per
//! operation in a shared [`FaultPlan`]; each call of that operation takes
//! the next one. Nothing here is wired into production configuration.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};
use tokio_util::sync::CancellationToken;

/// The operations a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A single-request write (`put`, `put_opts`).
    Put,
    /// Starting a multipart upload.
    CreateMultipart,
    /// One part of a multipart upload.
    Part,
    /// Completing a multipart upload.
    Complete,
    /// `get`, `get_range`.
    Get,
    Head,
    Delete,
    /// `rename`, `copy` (and their create-only forms).
    Rename,
    List,
}

/// What happens to the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Fails like a 503 or a reset connection: worth retrying.
    Transient,
    /// Fails like a 403 (a bucket policy changed): retrying cannot help.
    PermissionDenied,
    /// Fails like a 404 on a bucket that vanished.
    NotFound,
    /// Fails with `ENOSPC`.
    DiskFull,
    /// Succeeds after this extra delay.
    Latency(Duration),
    /// Never completes until [`FaultPlan::release_hangs`].
    Hang,
    /// Writes only the first `n` bytes (`Put`, `Part`) and reports success.
    ShortWrite(usize),
    /// Does the operation, then reports a transient failure: the response
    /// was lost after the server acted (C3).
    LoseResponse,
}

#[derive(Default)]
struct State {
    queued: HashMap<Op, VecDeque<Fault>>,
    calls: HashMap<Op, usize>,
    injected: HashMap<Op, usize>,
}

/// The faults still to inject, shared by the test and the store.
#[derive(Clone, Default)]
pub struct FaultPlan {
    state: Arc<Mutex<State>>,
    release: CancellationToken,
}

impl fmt::Debug for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FaultPlan")
    }
}

impl FaultPlan {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next `times` calls of `op` suffer `fault` (after any
    /// already queued).
    pub fn inject(&self, op: Op, fault: Fault, times: usize) {
        let mut s = self.lock();
        let q = s.queued.entry(op).or_default();
        q.extend(std::iter::repeat_n(fault, times));
    }

    /// Forgets every queued fault.
    pub fn clear(&self) {
        self.lock().queued.clear();
    }

    /// Calls of `op` seen so far (faulty or not).
    pub fn calls(&self, op: Op) -> usize {
        self.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// Faults injected into `op` so far.
    pub fn injected(&self, op: Op) -> usize {
        self.lock().injected.get(&op).copied().unwrap_or(0)
    }

    /// Faults of `op` still queued.
    pub fn pending(&self, op: Op) -> usize {
        self.lock().queued.get(&op).map_or(0, VecDeque::len)
    }

    /// Lets every hung call (now and later) go on.
    pub fn release_hangs(&self) {
        self.release.cancel();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, op: Op) -> Option<Fault> {
        let mut s = self.lock();
        *s.calls.entry(op).or_default() += 1;
        let fault = s.queued.get_mut(&op).and_then(VecDeque::pop_front);
        if fault.is_some() {
            *s.injected.entry(op).or_default() += 1;
        }
        fault
    }
}

fn injected_error(fault: &Fault, op: Op, path: &str) -> object_store::Error {
    let source =
        |what: &str| -> Box<dyn std::error::Error + Send + Sync> { format!("injected fault: {what} on {op:?}").into() };
    match fault {
        Fault::PermissionDenied => {
            object_store::Error::PermissionDenied { path: path.to_owned(), source: source("permission denied") }
        }
        Fault::NotFound => object_store::Error::NotFound { path: path.to_owned(), source: source("not found") },
        Fault::DiskFull => object_store::Error::Generic {
            store: "Faulty",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::StorageFull)),
        },
        _ => object_store::Error::Generic { store: "Faulty", source: source("503 slow down") },
    }
}

/// What to do around the real call, decided before it.
enum Plan {
    Pass,
    Fail(object_store::Error),
    Delay(Duration),
    Hang(CancellationToken),
    Short(usize),
    LoseResponse,
}

impl FaultPlan {
    fn plan(&self, op: Op, path: &str) -> Plan {
        match self.take(op) {
            None => Plan::Pass,
            Some(Fault::Latency(d)) => Plan::Delay(d),
            Some(Fault::Hang) => Plan::Hang(self.release.clone()),
            Some(Fault::ShortWrite(n)) => Plan::Short(n),
            Some(Fault::LoseResponse) => Plan::LoseResponse,
            Some(f) => Plan::Fail(injected_error(&f, op, path)),
        }
    }
}

impl Plan {
    /// Applies the part of the fault that comes before the real call.
    /// `Err` means the call must not reach the backend.
    async fn before(&self) -> Result<(), object_store::Error> {
        match self {
            Plan::Fail(_) => Err(object_store::Error::Generic { store: "Faulty", source: "unreachable".into() }),
            Plan::Delay(d) => {
                tokio::time::sleep(*d).await;
                Ok(())
            }
            Plan::Hang(release) => {
                release.cancelled().await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn run<T>(
        self,
        op: Op,
        call: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        if let Plan::Fail(e) = self {
            return Err(e);
        }
        self.before().await?;
        let out = call.await?;
        if matches!(self, Plan::LoseResponse) {
            return Err(injected_error(&Fault::Transient, op, "response lost"));
        }
        Ok(out)
    }
}

/// An `ObjectStore` that injects the faults of its [`FaultPlan`] into the
/// backend it wraps.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    plan: FaultPlan,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, plan: FaultPlan) -> Self {
        Self { inner, plan }
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

/// The first `n` bytes of a payload.
fn truncate(payload: PutPayload, n: usize) -> PutPayload {
    let mut all = Vec::with_capacity(payload.content_length());
    for b in payload.iter() {
        all.extend_from_slice(b);
    }
    all.truncate(n);
    PutPayload::from(all)
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let plan = self.plan.plan(Op::Put, location.as_ref());
        let payload = match plan {
            Plan::Short(n) => truncate(payload, n),
            _ => payload,
        };
        plan.run(Op::Put, self.inner.put_opts(location, payload, opts)).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let plan = self.plan.plan(Op::CreateMultipart, location.as_ref());
        let upload = plan.run(Op::CreateMultipart, self.inner.put_multipart_opts(location, opts)).await?;
        Ok(Box::new(FaultyUpload { inner: upload, plan: self.plan.clone(), path: location.to_string() }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        let op = if options.head { Op::Head } else { Op::Get };
        self.plan.plan(op, location.as_ref()).run(op, self.inner.get_opts(location, options)).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        // Faults are decided per path before the backend sees it; a failed
        // path is answered here and never deleted.
        let plan = self.plan.clone();
        let inner = self.inner.clone();
        let checked = locations
            .then(move |loc| {
                let plan = plan.clone();
                async move {
                    let loc = loc?;
                    let p = plan.plan(Op::Delete, loc.as_ref());
                    if let Plan::Fail(e) = p {
                        return Err(e);
                    }
                    p.before().await?;
                    Ok(loc)
                }
            })
            .boxed();
        // Failed paths pass through the backend's stream as errors.
        inner.delete_stream(checked)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        match self.plan.plan(Op::List, prefix.map_or("", |p| p.as_ref())) {
            Plan::Fail(e) => futures::stream::once(async move { Err(e) }).boxed(),
            _ => self.inner.list(prefix),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let plan = self.plan.plan(Op::List, prefix.map_or("", |p| p.as_ref()));
        plan.run(Op::List, self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.plan.plan(Op::Rename, to.as_ref()).run(Op::Rename, self.inner.copy_opts(from, to, options)).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        // Forwarded as a rename: the backend's own create-only rename is
        // what keeps commits atomic.
        self.plan.plan(Op::Rename, to.as_ref()).run(Op::Rename, self.inner.rename_opts(from, to, options)).await
    }
}

/// A multipart upload whose parts and completion suffer the plan's faults.
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    plan: FaultPlan,
    path: String,
}

impl fmt::Debug for FaultyUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyUpload({})", self.path)
    }
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let plan = self.plan.plan(Op::Part, &self.path);
        // A failed part never reaches the backend, so the backend's part
        // numbering is untouched by it.
        if let Plan::Fail(e) = plan {
            return Box::pin(async move { Err(e) });
        }
        let data = match plan {
            Plan::Short(n) => truncate(data, n),
            _ => data,
        };
        let part = self.inner.put_part(data);
        Box::pin(plan.run(Op::Part, part))
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let plan = self.plan.plan(Op::Complete, &self.path);
        plan.run(Op::Complete, self.inner.complete()).await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    fn store() -> (FaultyStore, FaultPlan) {
        let plan = FaultPlan::new();
        (FaultyStore::new(Arc::new(object_store::memory::InMemory::new()), plan.clone()), plan)
    }

    #[tokio::test]
    async fn faults_are_taken_in_order_then_calls_pass() {
        let (s, plan) = store();
        let p = Path::from("a");
        plan.inject(Op::Put, Fault::Transient, 1);
        plan.inject(Op::Put, Fault::PermissionDenied, 1);
        assert!(matches!(s.put(&p, "x".into()).await, Err(object_store::Error::Generic { .. })));
        assert!(matches!(s.put(&p, "x".into()).await, Err(object_store::Error::PermissionDenied { .. })));
        s.put(&p, "x".into()).await.unwrap();
        assert_eq!((plan.calls(Op::Put), plan.injected(Op::Put), plan.pending(Op::Put)), (3, 2, 0));
    }

    #[tokio::test]
    async fn a_short_write_succeeds_with_fewer_bytes() {
        let (s, plan) = store();
        let p = Path::from("short");
        plan.inject(Op::Put, Fault::ShortWrite(3), 1);
        s.put(&p, "abcdef".into()).await.unwrap();
        assert_eq!(&s.get(&p).await.unwrap().bytes().await.unwrap()[..], b"abc");
    }

    #[tokio::test]
    async fn a_lost_response_still_writes() {
        let (s, plan) = store();
        let p = Path::from("lost");
        plan.inject(Op::Put, Fault::LoseResponse, 1);
        assert!(s.put(&p, "data".into()).await.is_err());
        assert_eq!(&s.get(&p).await.unwrap().bytes().await.unwrap()[..], b"data");
    }

    #[tokio::test]
    async fn a_hang_lasts_until_released() {
        let (s, plan) = store();
        plan.inject(Op::Head, Fault::Hang, 1);
        let s = Arc::new(s);
        let task = {
            let s = s.clone();
            tokio::spawn(async move { s.head(&Path::from("nothing")).await })
        };
        // The head is parked on the plan's token (counted, not answered).
        while plan.calls(Op::Head) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!task.is_finished());
        plan.release_hangs();
        assert!(matches!(task.await.unwrap(), Err(object_store::Error::NotFound { .. })));
    }

    #[tokio::test]
    async fn a_failed_part_does_not_reach_the_backend() {
        let (s, plan) = store();
        let p = Path::from("mp");
        plan.inject(Op::Part, Fault::Transient, 1);
        let mut up = s.put_multipart(&p).await.unwrap();
        assert!(up.put_part(PutPayload::from("lost")).await.is_err());
        up.put_part(PutPayload::from("kept")).await.unwrap();
        up.complete().await.unwrap();
        assert_eq!(&s.get(&p).await.unwrap().bytes().await.unwrap()[..], b"kept");
    }
}
