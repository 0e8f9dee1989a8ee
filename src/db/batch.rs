//! Group commit. Requests that must write before they answer (an event and its deliveries, an
//! invocation and its delivery) hand their writes to a [`Batcher`], which writes everything that
//! is waiting as one batch — multi-row statements where the job kind allows — in one transaction,
//! and commits once. On a 2-core machine the per-statement and per-commit overheads, not the SQL,
//! are the cost, so many small requests share them. Each request gets its answer only after the
//! commit that made its writes durable.
//!
//! A failing batch (a unique-key race, say) is rolled back and retried one job per transaction,
//! so one bad job never fails its neighbours.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Database, DbError, Tx};

/// A boxed future borrowing the batch and the transaction.
pub type BatchFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DbError>> + Send + 'a>>;

/// Work that runs in a shared transaction. `write_batch` may run twice for the same job (after a
/// rollback), so it must derive everything it writes from the jobs' own fields.
pub trait Job: Send + Sync + Sized + 'static {
    /// What the submitter receives after the commit.
    type Output: Send + 'static;

    /// Writes all `jobs` and returns one output per job, in order.
    fn write_batch<'a>(jobs: &'a [Self], tx: &'a mut Tx) -> BatchFuture<'a, Vec<Self::Output>>;
}

type Reply<J> = oneshot::Sender<Result<<J as Job>::Output, DbError>>;
type Queue<J> = Arc<Mutex<mpsc::Receiver<(J, Reply<J>)>>>;

/// Submits jobs of one kind to the group-commit writers.
pub struct Batcher<J: Job> {
    queue: mpsc::Sender<(J, Reply<J>)>,
}

impl<J: Job> Clone for Batcher<J> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

/// Most jobs in one transaction.
const MAX_BATCH: usize = 256;

impl<J: Job> Batcher<J> {
    /// Starts `writers` writer tasks (one for SQLite's single writer; several for PostgreSQL).
    pub fn start(db: Database, writers: usize) -> Self {
        let (tx, rx) = mpsc::channel::<(J, Reply<J>)>(16 * 1024);
        // Writers take turns draining the queue; each then commits its own batch.
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(writer(db.clone(), rx.clone()));
        }
        Self { queue: tx }
    }

    /// Runs `job` in the next batch and returns its output once committed.
    pub async fn submit(&self, job: J) -> Result<J::Output, DbError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((job, reply))
            .await
            .map_err(|_| DbError::Batch("the writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| DbError::Batch("the writer has stopped".into()))?
    }
}

async fn writer<J: Job>(db: Database, rx: Queue<J>) {
    let mut jobs: Vec<J> = Vec::with_capacity(MAX_BATCH);
    let mut replies: Vec<Reply<J>> = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut rx = rx.lock().await;
            let Some((job, reply)) = rx.recv().await else {
                return;
            };
            jobs.push(job);
            replies.push(reply);
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok((job, reply)) => {
                        jobs.push(job);
                        replies.push(reply);
                    }
                    Err(_) => break,
                }
            }
        }
        metrics::histogram!("opsiq_write_batch_size").record(jobs.len() as f64);
        let started = std::time::Instant::now();
        let result = run(&db, &jobs).await;
        metrics::histogram!("opsiq_write_batch_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(outputs) => {
                for (reply, out) in replies.drain(..).zip(outputs) {
                    let _ = reply.send(Ok(out));
                }
            }
            Err(e) if jobs.len() == 1 => {
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(e.clone_for_reply()));
                }
            }
            Err(_) => {
                // Retry one job per transaction so each failure stays with its own job.
                for (job, reply) in jobs.iter().zip(replies.drain(..)) {
                    let result = run(&db, std::slice::from_ref(job)).await.and_then(|mut out| {
                        out.pop()
                            .ok_or_else(|| DbError::Batch("the write produced no result".into()))
                    });
                    let _ = reply.send(result);
                }
            }
        }
        jobs.clear();
    }
}

async fn run<J: Job>(db: &Database, jobs: &[J]) -> Result<Vec<J::Output>, DbError> {
    let mut tx = db.begin().await?;
    match J::write_batch(jobs, &mut tx).await {
        Ok(outputs) => {
            tx.commit().await?;
            Ok(outputs)
        }
        Err(e) => {
            // Free the writer for the retry at once instead of on its next use.
            tx.rollback().await;
            Err(e)
        }
    }
}
