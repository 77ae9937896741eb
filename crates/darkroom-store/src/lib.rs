//! Darkroom's durable store. One [`Store`] trait, implemented on SQLite (the embedded default, one gateway) and
//! PostgreSQL (several gateways sharing one database), and a [`conformance`] suite that both must pass.
//!
//! Rules every implementation keeps:
//! - a job is durable before `enqueue` returns;
//! - a job runs under a lease; each claim increments `attempts`, and the attempt number is the fencing token:
//!   completions, logs and retries carry it, and a stale token changes nothing;
//! - a completed job never changes again (no job completes twice);
//! - FIFO within a priority, higher priority first.

use async_trait::async_trait;
use darkroom_core::Millis;
use darkroom_core::job::{JobRecord, LogEntry, NewJob, Outcome};

#[macro_use]
mod rows;
pub mod conformance;
pub mod deploy;
mod index;
pub mod migrate;
pub mod pg;
pub mod sqlite;
pub mod testing;
pub mod usage;
mod writer;

pub use deploy::{DeploymentRecord, SecretRecord};
pub use index::JobBrief;
pub use pg::PgStore;
pub use sqlite::SqliteStore;
pub use usage::{Budget, UsageBucket, UsageFilter, UsageGroup, UsageLine};

/// What a shared store tells the other gateways (PostgreSQL `LISTEN/NOTIFY`). Only a wake-up hint: a receiver
/// that misses one finds the same state by polling.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
pub enum StoreEvent {
    /// A job of the app became claimable (enqueued or requeued).
    Queued { app_id: String },
    /// A job's status changed (claimed, new logs).
    Changed { job_id: String },
    /// A job completed.
    Finished { job_id: String },
    /// An attempt ended without the runner completing it (lease expired, runner lost): its holder must let go.
    AttemptEnded { job_id: String, token: i64 },
    /// A running job was cancelled: the gateway holding the runner's channel tells it to stop.
    Cancelled { job_id: String, runner_id: String, token: i64 },
}

/// A gateway process sharing the store, as recorded by [`Store::join_cluster`].
#[derive(Debug, Clone, PartialEq)]
pub struct BootRecord {
    pub id: String,
    /// Where other gateways reach this one (relaying streams).
    pub url: Option<String>,
    pub started_at: Millis,
    pub heartbeat_at: Millis,
    pub reaped_at: Option<Millis>,
}

/// Store failures. These are internal: the gateway logs them and answers 500.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("duplicate: {0}")]
    Duplicate(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Refused(String),
    #[error("idempotency key reused with a different request (first used by {0})")]
    IdempotencyMismatch(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The outcome of a sync or stream request whose gateway died: nobody waits for it any more.
pub(crate) fn gateway_restarted() -> Outcome {
    Outcome::platform(&darkroom_core::error::ApiError::new(
        darkroom_core::error::ErrorType::GatewayRestarted,
        "The gateway restarted while this request was open",
    ))
}

/// The outcome of an attempt whose runner was lost.
pub(crate) fn runner_lost() -> Outcome {
    Outcome::platform(&darkroom_core::error::ApiError::new(
        darkroom_core::error::ErrorType::RunnerDisconnected,
        "The runner serving this request was lost",
    ))
}

/// An API key as stored (the secret only as a keyed hash).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub owner_id: String,
    #[serde(skip)]
    pub secret_hash: String,
    pub scope: String,
    pub name: String,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
    /// Webhook dialect for this key's requests (`fal` or `standard`); None: the server's default.
    pub webhook_dialect: Option<String>,
}

/// A runner token as stored (hash only). Tokens belong to one server boot.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerTokenRecord {
    pub token_hash: String,
    pub boot_id: String,
    pub app_id: Option<String>,
    pub created_at: Millis,
    pub revoked_at: Option<Millis>,
}

/// What happened when a boot started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BootReport {
    /// Queue jobs that were running under the previous boot and went back to the queue.
    pub requeued: Vec<String>,
    /// Jobs completed because of the restart: ephemeral jobs, or queue jobs out of attempts.
    pub failed: Vec<String>,
    pub tokens_revoked: u64,
}

impl BootReport {
    /// Counts attempts ended by a reaping or a restart.
    pub fn record(&mut self, ended: Vec<(String, AttemptResult)>) {
        for (id, res) in ended {
            match res {
                AttemptResult::Requeued => self.requeued.push(id),
                AttemptResult::Completed => self.failed.push(id),
                AttemptResult::Stale => {}
            }
        }
    }
}

/// The result of ending an attempt that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum AttemptResult {
    /// Back in the queue for another attempt.
    Requeued,
    /// Out of attempts (or retries disabled): completed with the given outcome.
    Completed,
    /// The token was not the job's current one, or the job was not running: nothing changed.
    Stale,
}

/// The result of a completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompleteResult {
    Applied,
    /// Not the current attempt, or not running: refused.
    Stale,
}

/// The result of a cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelResult {
    NotFound,
    AlreadyCompleted,
    /// Completed as cancelled. If it was running, the runner and token to send the cancel to.
    Cancelled {
        running_on: Option<(String, i64)>,
    },
}

/// The result of deleting a request's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteResult {
    NotFound,
    /// Only completed requests can be deleted (cancel first).
    NotCompleted,
    Deleted,
}

/// Filter for listing jobs (newest first).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub owner_id: Option<String>,
    pub app_id: Option<String>,
    pub state: Option<String>,
    /// Submitted at or after this time.
    pub created_after: Option<Millis>,
    /// Submitted before this time.
    pub created_before: Option<Millis>,
    pub limit: i64,
}

/// A webhook delivery (the outbox row): one per finished request that asked for a webhook.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WebhookDelivery {
    pub id: String,
    pub job_id: String,
    pub owner_id: String,
    pub url: String,
    /// The exact body every attempt sends.
    pub body: String,
    pub dialect: String,
    /// pending, delivered or dead.
    pub state: String,
    pub attempts: i64,
    /// `attempts` when the current round of the schedule began (manual redelivery starts a new round).
    pub round_start: i64,
    pub next_attempt_at: Option<Millis>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub traceparent: Option<String>,
    pub created_at: Millis,
    pub delivered_at: Option<Millis>,
}

/// One delivery attempt, for the delivery log.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WebhookAttempt {
    pub attempt: i64,
    pub started_at: Millis,
    pub duration_ms: i64,
    pub status: Option<i64>,
    pub error: Option<String>,
}

/// What an attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryNext {
    Delivered,
    Retry {
        at: Millis,
    },
    /// Out of attempts: dead-lettered (the result stays fetchable; redelivery is manual).
    Dead,
}

/// Filter for listing deliveries (newest first).
#[derive(Debug, Clone, Default)]
pub struct WebhookFilter {
    pub owner_id: Option<String>,
    pub job_id: Option<String>,
    pub state: Option<String>,
    pub limit: i64,
}

/// A webhook signing key.
#[derive(Debug, Clone, PartialEq)]
pub struct SigningKeyRecord {
    pub kid: String,
    pub secret: String,
    pub created_at: Millis,
    pub retired_at: Option<Millis>,
}

/// A file in object storage (an upload, or an app's output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    /// Time-ordered id (UUIDv7, hex); the object key is made from it.
    pub id: String,
    pub owner_id: String,
    /// The name given at upload (display and download name only, never part of a key).
    pub file_name: String,
    pub content_type: String,
    pub size: i64,
    /// `pending` until its bytes are in, then `ready`.
    pub state: String,
    /// Readable without a signature.
    pub public: bool,
    /// The request whose output it is.
    pub job_id: Option<String>,
    pub created_at: Millis,
    pub completed_at: Option<Millis>,
    pub expires_at: Option<Millis>,
}

impl FileRecord {
    pub fn is_ready(&self) -> bool {
        self.state == "ready"
    }
}

/// Which files to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct FileFilter {
    pub owner_id: Option<String>,
    /// Only files with an id below this (the previous page's last id).
    pub before: Option<String>,
    pub limit: i64,
}

/// Per-app counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppDepth {
    pub app_id: String,
    pub queued: i64,
    pub running: i64,
    /// When the oldest queued job was submitted.
    pub oldest_queued_at: Option<Millis>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;

    /// Records a new server boot as the only gateway on this store: revokes every runner token of earlier boots
    /// and ends every lease they held (queue jobs go back to the queue while attempts remain; sync and stream jobs
    /// complete as `gateway_restarted`, since they are never retried after a gateway dies). Claims made through
    /// this store from now on are recorded as this boot's.
    async fn start_boot(&self, boot_id: &str, now: Millis) -> StoreResult<BootReport>;
    /// Records a new boot beside other live gateways (a shared store): nothing of theirs is touched. `url` is where
    /// the others reach this gateway. Claims made through this store from now on are recorded as this boot's.
    async fn join_cluster(&self, boot_id: &str, url: Option<&str>, now: Millis) -> StoreResult<()>;
    /// A live gateway's heartbeat. False if the boot was reaped as dead (the gateway must stop: its tokens are
    /// revoked and its requests were ended).
    async fn heartbeat_boot(&self, boot_id: &str, now: Millis) -> StoreResult<bool>;
    /// Reaps boots whose heartbeat is older than `dead_before` (and `also`, a boot known dead): their runner tokens
    /// are revoked, their sync and stream requests complete as `gateway_restarted`, and the attempts their runners
    /// held end (requeued while attempts remain).
    async fn reap_boots(&self, dead_before: Millis, also: Option<&str>, now: Millis) -> StoreResult<BootReport>;
    async fn get_boot(&self, boot_id: &str) -> StoreResult<Option<BootRecord>>;
    /// Tries to become (or checks it still is) the one gateway that runs the sweepers. Always true for a store
    /// only one gateway can open.
    async fn try_lead(&self) -> StoreResult<bool>;
    /// Events written by other gateways sharing this store (None: nobody else shares it).
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>>;
    /// Returns the setting's stored value, storing `value` first if it has none.
    async fn ensure_setting(&self, name: &str, value: &str) -> StoreResult<String>;

    async fn insert_key(&self, key: &KeyRecord) -> StoreResult<()>;
    async fn get_key(&self, key_id: &str) -> StoreResult<Option<KeyRecord>>;
    async fn list_keys(&self, owner_id: Option<&str>) -> StoreResult<Vec<KeyRecord>>;
    /// Returns false if the key does not exist or was already revoked.
    async fn revoke_key(&self, key_id: &str, now: Millis) -> StoreResult<bool>;

    async fn insert_runner_token(&self, token: &RunnerTokenRecord) -> StoreResult<()>;
    async fn get_runner_token(&self, token_hash: &str) -> StoreResult<Option<RunnerTokenRecord>>;

    /// Durably enqueues a job. Fails with `Duplicate` if the id exists.
    async fn enqueue(&self, job: &NewJob) -> StoreResult<JobRecord>;
    /// Enqueues unless the owner already used `key` since `not_before`: then the earlier job is returned
    /// (`false`: not created). A key reused with another input hash is `Err(IdempotencyMismatch)`.
    async fn enqueue_idempotent(
        &self,
        job: &NewJob,
        key: &str,
        input_hash: &str,
        not_before: Millis,
    ) -> StoreResult<(JobRecord, bool)>;
    /// Queued and running jobs of a key (for per-key concurrency limits).
    async fn count_active_for_key(&self, key_id: &str) -> StoreResult<i64>;
    /// Queued jobs of an app (for queue-length limits).
    async fn count_queued(&self, app_id: &str) -> StoreResult<i64>;
    async fn get_job(&self, id: &str) -> StoreResult<Option<JobRecord>>;
    /// 0-based position among the app's queued jobs; None unless queued.
    async fn queue_position(&self, id: &str) -> StoreResult<Option<i64>>;
    /// Queued jobs of a key at or above a priority (caps interactive priority per key).
    async fn count_queued_for_key(&self, key_id: &str, min_priority: i64) -> StoreResult<i64>;
    /// The app's next queued job (id, runner hint), without claiming it.
    async fn next_queued(&self, app_id: &str, limit: i64) -> StoreResult<Vec<(String, Option<String>)>>;
    /// What an in-memory index knows of an active (queued or running) job, if the store keeps one: enough for a
    /// status poll. None means "ask [`Store::get_job`]".
    async fn job_brief(&self, _id: &str) -> StoreResult<Option<JobBrief>> {
        Ok(None)
    }
    /// Claims several queued jobs, each for its runner, under one lease deadline; None where a job is no longer
    /// queued. Stores that can do it commit them together.
    async fn claim_many(
        &self,
        claims: &[(String, String)],
        lease_until: Millis,
        now: Millis,
    ) -> StoreResult<Vec<Option<JobRecord>>> {
        let mut out = Vec::with_capacity(claims.len());
        for (job, runner) in claims {
            out.push(self.claim(job, runner, lease_until, now).await?);
        }
        Ok(out)
    }
    /// Enqueues a job and, when it can, hands it straight to `runner_id` (claim at submit): the returned flag says
    /// whether the job is already running there. Stores that can do it commit both in one transaction.
    async fn enqueue_claimed(
        &self,
        job: &NewJob,
        runner_id: &str,
        lease_until: Millis,
        now: Millis,
    ) -> StoreResult<(JobRecord, bool)> {
        let rec = self.enqueue(job).await?;
        match self.claim(&job.id, runner_id, lease_until, now).await? {
            Some(r) => Ok((r, true)),
            None => Ok((rec, false)),
        }
    }
    /// Claims a queued job for a runner: running, attempts + 1, leased until `lease_until`. The returned record's
    /// `attempts` is the fencing token. None if the job is no longer queued.
    async fn claim(
        &self,
        job_id: &str,
        runner_id: &str,
        lease_until: Millis,
        now: Millis,
    ) -> StoreResult<Option<JobRecord>>;
    /// Extends the leases of the listed jobs the runner holds (the ones it reports running; a job it no longer
    /// reports lets its lease run out).
    async fn extend_leases(&self, runner_id: &str, job_ids: &[String], lease_until: Millis) -> StoreResult<u64>;
    /// Completes the current attempt. Refused (Stale) unless the job is running with this token.
    async fn complete(&self, job_id: &str, token: i64, outcome: &Outcome, now: Millis) -> StoreResult<CompleteResult>;
    /// Ends a failed attempt: requeue while attempts remain and retries are allowed, else complete with `outcome`.
    async fn fail_attempt(
        &self,
        job_id: &str,
        token: i64,
        outcome: &Outcome,
        now: Millis,
    ) -> StoreResult<AttemptResult>;
    /// A runner is gone: fail the attempts of every job it holds (`runner_disconnected`).
    async fn release_runner(&self, runner_id: &str, now: Millis) -> StoreResult<Vec<(String, AttemptResult)>>;
    /// Fails the attempts whose lease ran out.
    async fn expire_leases(&self, now: Millis) -> StoreResult<Vec<(String, AttemptResult)>>;
    /// Completes queued jobs whose start deadline passed as `request_timeout`.
    async fn expire_start_deadlines(&self, now: Millis) -> StoreResult<Vec<String>>;
    /// Cancels a queued or running job (it completes as `request_cancelled`).
    async fn cancel(&self, job_id: &str, now: Millis) -> StoreResult<CancelResult>;
    /// Appends log lines to the current attempt. False (nothing written) if the token is stale.
    async fn append_logs(&self, job_id: &str, token: i64, entries: &[LogEntry]) -> StoreResult<bool>;
    async fn get_logs(&self, job_id: &str) -> StoreResult<Vec<LogEntry>>;
    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobRecord>>;
    async fn app_depths(&self) -> StoreResult<Vec<AppDepth>>;

    /// Claims up to `limit` pending deliveries that are due, leasing them until `lease_until`.
    async fn claim_due_webhooks(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: i64,
    ) -> StoreResult<Vec<WebhookDelivery>>;
    /// The earliest time a pending delivery can be claimed (due, and not leased).
    async fn next_webhook_due(&self) -> StoreResult<Option<Millis>>;
    /// Records an attempt and what follows it (only while the delivery is leased to the attempt).
    async fn record_webhook_attempt(
        &self,
        id: &str,
        attempt: &WebhookAttempt,
        next: DeliveryNext,
        now: Millis,
    ) -> StoreResult<()>;
    async fn list_webhooks(&self, filter: &WebhookFilter) -> StoreResult<Vec<WebhookDelivery>>;
    async fn get_webhook(&self, id: &str) -> StoreResult<Option<(WebhookDelivery, Vec<WebhookAttempt>)>>;
    /// Starts a new round of the schedule now, whatever the delivery's state. False if unknown, or while an attempt
    /// holds its lease.
    async fn redeliver_webhook(&self, id: &str, now: Millis) -> StoreResult<bool>;
    /// Deletes a completed request's input, result and logs (its metadata stays).
    async fn delete_payload(&self, job_id: &str, now: Millis) -> StoreResult<DeleteResult>;
    /// Retention: deletes the payloads of up to `limit` requests completed before `completed_before`.
    async fn purge_payloads(&self, completed_before: Millis, now: Millis, limit: i64) -> StoreResult<Vec<String>>;
    /// No more retries for this job (a stream that has sent output must not replay it).
    async fn disable_retries(&self, job_id: &str) -> StoreResult<()>;
    async fn list_signing_keys(&self) -> StoreResult<Vec<SigningKeyRecord>>;
    /// Adds a signing key; with `retire_others`, every other active key is retired at `now`.
    async fn insert_signing_key(&self, key: &SigningKeyRecord, retire_others: bool) -> StoreResult<()>;

    /// Records a file (pending, or ready when its bytes are already stored).
    /// Records that the job's current attempt waited `ms` for a runner to start. False if `token` is stale.
    async fn set_cold_start(&self, job_id: &str, token: i64, ms: i64) -> StoreResult<bool>;
    /// Run-time scaling overrides of every app (app id, JSON patch).
    async fn list_app_scaling(&self) -> StoreResult<Vec<(String, String)>>;
    /// Sets (or with None, clears) an app's run-time scaling overrides.
    async fn set_app_scaling(&self, app_id: &str, patch: Option<&str>, now: Millis) -> StoreResult<()>;

    async fn insert_file(&self, file: &FileRecord) -> StoreResult<()>;
    async fn get_file(&self, id: &str) -> StoreResult<Option<FileRecord>>;
    /// Marks a pending file ready with its size; false if it is not pending (already done, or gone).
    async fn finish_file(&self, id: &str, size: i64, now: Millis) -> StoreResult<bool>;
    async fn list_files(&self, filter: &FileFilter) -> StoreResult<Vec<FileRecord>>;
    async fn delete_file(&self, id: &str) -> StoreResult<bool>;
    /// Files past their expiry, and uploads still pending since before `pending_before`, oldest first.
    async fn expired_files(&self, now: Millis, pending_before: Millis, limit: i64) -> StoreResult<Vec<FileRecord>>;

    /// Usage lines, newest first.
    async fn list_usage(&self, filter: &UsageFilter) -> StoreResult<Vec<UsageLine>>;
    /// Usage summed per time bucket (`bucket_ms`; None: one bucket for the whole range) and per group, oldest
    /// bucket first.
    async fn summarize_usage(
        &self,
        filter: &UsageFilter,
        bucket_ms: Option<i64>,
        groups: &[UsageGroup],
    ) -> StoreResult<Vec<UsageBucket>>;
    /// What an owner spent since a time, in nano-units of currency.
    async fn owner_spend(&self, owner_id: &str, since: Millis) -> StoreResult<i64>;
    /// Sets (replaces) an owner's budget.
    async fn set_budget(&self, budget: &Budget) -> StoreResult<()>;
    /// False if the owner had none.
    async fn delete_budget(&self, owner_id: &str) -> StoreResult<bool>;
    async fn list_budgets(&self, owner_id: Option<&str>) -> StoreResult<Vec<Budget>>;

    /// Inserts or replaces a deployed app. With `expect_version`, only if its stored version is that (0: none
    /// stored yet); returns false when it was not (a concurrent deploy won).
    async fn put_deployment(&self, d: &DeploymentRecord, expect_version: Option<i64>) -> StoreResult<bool>;
    async fn get_deployment(&self, app_id: &str) -> StoreResult<Option<DeploymentRecord>>;
    async fn list_deployments(&self) -> StoreResult<Vec<DeploymentRecord>>;
    async fn delete_deployment(&self, app_id: &str) -> StoreResult<bool>;
    async fn set_secret(&self, s: &SecretRecord) -> StoreResult<()>;
    async fn list_secrets(&self) -> StoreResult<Vec<SecretRecord>>;
    async fn delete_secret(&self, name: &str) -> StoreResult<bool>;
}
