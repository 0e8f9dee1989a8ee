//! Group commit. Requests that must write before they answer (an event and its deliveries, an
//! invocation and its delivery) hand their writes to a [`Batcher`], which runs everything that is
//! waiting in one transaction and commits once: on a 2-core machine the commit, not the SQL, is
//! the cost, so many small requests share it. Each request still gets its answer only after the
//! commit that made its writes durable.
//!
//! A job that fails (a unique-key race, say) rolls the batch back; the batch is then retried one
//! job per transaction, so one bad job never fails its neighbours.

use std::future::Future;
use std::pin::Pin;

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Database, DbError, Tx};

/// Work that runs inside a shared transaction. `write` may run twice (after a batch rollback),
/// so it must derive everything it writes from its own fields.
pub trait Job: Send + 'static {
    /// What the submitter receives after the commit.
    type Output: Send + 'static;

    /// Performs the writes and returns the output to deliver once committed.
    fn write<'a>(
        &'a mut self,
        tx: &'a mut Tx,
    ) -> Pin<Box<dyn Future<Output = Result<Self::Output, DbError>> + Send + 'a>>;
}

trait ErasedJob: Send {
    fn write<'a>(
        &'a mut self,
        tx: &'a mut Tx,
    ) -> Pin<Box<dyn Future<Output = Result<(), DbError>> + Send + 'a>>;
    fn finish(self: Box<Self>, committed: Result<(), String>);
}

struct Pending<J: Job> {
    job: J,
    output: Option<J::Output>,
    reply: oneshot::Sender<Result<J::Output, DbError>>,
}

impl<J: Job> ErasedJob for Pending<J> {
    fn write<'a>(
        &'a mut self,
        tx: &'a mut Tx,
    ) -> Pin<Box<dyn Future<Output = Result<(), DbError>> + Send + 'a>> {
        Box::pin(async move {
            self.output = Some(self.job.write(tx).await?);
            Ok(())
        })
    }

    fn finish(self: Box<Self>, committed: Result<(), String>) {
        let result = match (committed, self.output) {
            (Ok(()), Some(out)) => Ok(out),
            (Ok(()), None) => Err(DbError::Batch("the write produced no result".into())),
            (Err(e), _) => Err(DbError::Batch(e)),
        };
        let _ = self.reply.send(result);
    }
}

/// Submits jobs to the group-commit writers.
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Box<dyn ErasedJob>>,
}

/// Most jobs in one transaction.
const MAX_BATCH: usize = 256;

impl Batcher {
    /// Starts `writers` writer tasks (one for SQLite's single writer; several for PostgreSQL).
    pub fn start(db: Database, writers: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Box<dyn ErasedJob>>(16 * 1024);
        // Writers take turns draining the queue; each then commits its own batch.
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(writer(db.clone(), rx.clone()));
        }
        Self { queue: tx }
    }

    /// Runs `job` in the next batch and returns its output once committed.
    pub async fn submit<J: Job>(&self, job: J) -> Result<J::Output, DbError> {
        let (reply, answer) = oneshot::channel();
        let pending: Box<dyn ErasedJob> = Box::new(Pending {
            job,
            output: None,
            reply,
        });
        self.queue
            .send(pending)
            .await
            .map_err(|_| DbError::Batch("the writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| DbError::Batch("the writer has stopped".into()))?
    }
}

async fn writer(db: Database, rx: Arc<Mutex<mpsc::Receiver<Box<dyn ErasedJob>>>>) {
    let mut batch: Vec<Box<dyn ErasedJob>> = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        metrics::histogram!("opsiq_write_batch_size").record(batch.len() as f64);
        match run_all(&db, &mut batch).await {
            Ok(()) => batch.drain(..).for_each(|job| job.finish(Ok(()))),
            Err(_) if batch.len() > 1 => {
                // Retry one job per transaction so the failure stays with its own job.
                for mut job in batch.drain(..) {
                    let result = run_one(&db, &mut job).await.map_err(|e| e.to_string());
                    job.finish(result);
                }
            }
            Err(e) => {
                let message = e.to_string();
                batch.drain(..).for_each(|job| job.finish(Err(message.clone())));
            }
        }
    }
}

async fn run_all(db: &Database, batch: &mut [Box<dyn ErasedJob>]) -> Result<(), DbError> {
    let mut tx = db.begin().await?;
    for job in batch.iter_mut() {
        job.write(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn run_one(db: &Database, job: &mut Box<dyn ErasedJob>) -> Result<(), DbError> {
    let mut tx = db.begin().await?;
    job.write(&mut tx).await?;
    tx.commit().await?;
    Ok(())
}
