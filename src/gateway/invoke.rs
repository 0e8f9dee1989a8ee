//! The invocation path, in order: rate limit → action → scope → role → arguments against the
//! input schema → idempotency → persist the invocation and its delivery in one transaction →
//! deliver → (sync) wait for the endpoint's answer. HTTP `invoke`, MCP `tools/call` and rule
//! `invoke` outputs all come through [`invoke`].

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::invocations::InvocationRow;
use super::scope_allows;
use crate::agents::AgentPrincipal;
use crate::db::batch::Job;
use crate::db::{DbError, Tx, now_ms, rfc3339};
use crate::delivery::outbox::{self, Lease, NewDelivery};
use crate::http::{ApiError, ErrorDetail};
use crate::policy::Decision;
use crate::registry::guards::Verdict;
use crate::registry::model::{Approval, Mode};
use crate::registry::validators::Which;
use crate::registry::{Action, store};
use crate::{AppState, args, crypto, ids};

/// Who is invoking.
#[derive(Debug, Clone)]
pub enum Caller {
    /// An agent with a token.
    Agent(AgentPrincipal),
    /// A rule's `invoke` output (admin-configured: no scope or role check).
    Rule {
        /// Owning tenant.
        tenant_id: String,
        /// The rule.
        rule_id: String,
    },
}

impl Caller {
    /// The tenant.
    pub fn tenant_id(&self) -> &str {
        match self {
            Caller::Agent(p) => &p.tenant_id,
            Caller::Rule { tenant_id, .. } => tenant_id,
        }
    }

    /// `agent:<id>` or `rule:<id>`.
    pub fn principal(&self) -> String {
        match self {
            Caller::Agent(p) => p.principal(),
            Caller::Rule { rule_id, .. } => format!("rule:{rule_id}"),
        }
    }

    fn agent_id(&self) -> Option<&str> {
        match self {
            Caller::Agent(p) => Some(&p.agent_id),
            Caller::Rule { .. } => None,
        }
    }

    fn roles(&self) -> Vec<String> {
        match self {
            Caller::Agent(p) => p.roles.clone(),
            Caller::Rule { .. } => Vec::new(),
        }
    }

    /// The gateway-minted token the call was made with, if it was.
    fn token_id(&self) -> Option<&str> {
        match self {
            Caller::Agent(p) => p.jti.as_deref(),
            Caller::Rule { .. } => None,
        }
    }
}

/// One invocation request.
#[derive(Debug, Clone)]
pub struct InvokeRequest {
    /// Action name.
    pub action: String,
    /// Arguments (a JSON object).
    pub arguments: Value,
    /// The caller's idempotency key.
    pub idempotency_key: Option<String>,
    /// Wait for the endpoint even if the action is `async` (never shorter than the action says).
    pub wait: Option<Duration>,
    /// How a repeated `async` call is answered: as the first was (HTTP, where the first answer
    /// was a 202 with the status the call started in), or with where it stands now (MCP, whose
    /// tool result tells a model what happened, and must not say a finished call waits).
    pub repeat: Repeat,
}

/// How a repeated call is answered; see [`InvokeRequest::repeat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// With the first call's answer.
    AsFirst,
    /// With where the call stands now.
    AsItStands,
}

/// Runs an invocation and returns its record as it stands when the call answers.
pub async fn invoke(
    state: &AppState,
    caller: &Caller,
    req: InvokeRequest,
) -> Result<InvocationRow, ApiError> {
    let tenant_id = caller.tenant_id().to_string();
    if let Some(agent) = caller.agent_id() {
        state.gateway.rate_limit_agent(&tenant_id, agent).await?;
    }

    let cached = state.gateway.action(&state.db, &tenant_id, &req.action).await?;
    let Some(action) = cached.as_ref().as_ref().filter(|a| a.declaration.enabled) else {
        // A call made before the action was disabled, or deleted, is still answered as its key
        // says (a deleted action's call as it stands: there is no mode left to answer by), to
        // a caller who may still make it; anyone else finds no action, as without a key.
        if req.idempotency_key.is_some()
            && authorization_refusal(state, caller, &tenant_id, &req.action)
                .await?
                .is_none()
            && let Some(earlier) = answer_for_used_key(state, caller, cached.as_ref().as_ref(), &req).await?
        {
            return Ok(earlier);
        }
        return Err(ApiError::not_found("action").with_message(format!(
            "there is no enabled action named `{}`; list the tools to see what exists",
            req.action
        )));
    };
    state.gateway.rate_limit_action(&tenant_id, &req.action).await?;

    if let Some((code, message)) = authorization_refusal(state, caller, &tenant_id, &req.action).await? {
        record_refusal(state, caller, action, &req, "denied", code, &message).await?;
        return Err(ApiError::forbidden(code, message));
    }

    let problems = validate_arguments(state, &tenant_id, action, &req.arguments)?;
    if !problems.is_empty() {
        if let Some(earlier) = answer_for_used_key(state, caller, Some(action), &req).await? {
            return Ok(earlier);
        }
        let message = format!(
            "the arguments for {} do not match its input schema; fix the fields listed in details and call again",
            req.action
        );
        record_refusal(
            state,
            caller,
            action,
            &req,
            "failed",
            "validation_failed",
            &message,
        )
        .await?;
        return Err(ApiError::validation(message, problems));
    }

    let mut approval_reason = always_approve(action);
    let guards = state
        .gateway
        .validators
        .guards(
            &tenant_id,
            &req.action,
            action.version,
            &action.declaration.guards,
        )
        .map_err(ApiError::internal)?;
    let agent_id = caller
        .agent_id()
        .map(str::to_string)
        .unwrap_or_else(|| caller.principal());
    match crate::registry::guards::decide(
        guards.as_deref().unwrap_or_default(),
        &req.arguments,
        &agent_id,
        &caller.roles(),
        &req.action,
        action.version,
    ) {
        Some((Verdict::Deny, reason)) => {
            let message = format!("a guard on {} refused this call: {reason}", req.action);
            if let Some(earlier) = answer_for_used_key(state, caller, Some(action), &req).await? {
                return Ok(earlier);
            }
            record_refusal(state, caller, action, &req, "denied", "guard_denied", &message).await?;
            return Err(ApiError::forbidden("guard_denied", message));
        }
        Some((Verdict::RequireApproval, reason)) => approval_reason = Some(reason.to_string()),
        Some((Verdict::Allow, _)) | None => {}
    }
    let pending_approval = approval_reason.is_some();

    let read_only = action.declaration.annotations.read_only;
    if req.idempotency_key.is_none() && !read_only {
        return Err(ApiError::bad_request(
            "idempotency_key_required",
            format!(
                "{} changes data: send an Idempotency-Key so a retried call never runs twice",
                req.action
            ),
        ));
    }
    // No read before the write: a repeated key is caught by the unique index and answered below.
    let request_hash = request_hash(&req.action, &req.arguments);

    // A call that cannot be delivered is refused now, not accepted to fail later, and recorded
    // like every refusal. The tenant's enabled endpoints are read (cached) for the
    // `action.invoked` event's fan-out anyway.
    let subscribers = state.engine.subscribers(&tenant_id).await?;
    let endpoint_id = match &action.declaration.endpoint_id {
        Some(id) if subscribers.iter().any(|ep| &ep.id == id) => id.clone(),
        configured => {
            let message = match configured {
                None => format!(
                    "{} has no endpoint configured; an admin must set its endpoint_id",
                    req.action
                ),
                Some(_) => endpoint_unavailable(&req.action),
            };
            if let Some(earlier) = answer_for_used_key(state, caller, Some(action), &req).await? {
                return Ok(earlier);
            }
            record_refusal(
                state,
                caller,
                action,
                &req,
                "failed",
                "action_unavailable",
                &message,
            )
            .await?;
            return Err(ApiError::conflict("action_unavailable", message));
        }
    };
    let now = now_ms();
    let invocation_id = ids::new_id("inv");
    let body = action_request_body(&invocation_id, action, &req.arguments, caller, now);
    let job = PersistInvocation {
        tenant_id: tenant_id.clone(),
        invocation_id: invocation_id.clone(),
        principal: caller.principal(),
        agent_id: caller.agent_id().map(str::to_string),
        token_id: caller.token_id().map(str::to_string),
        roles: caller.roles(),
        action_name: req.action.clone(),
        action_version: action.version,
        action_hash: action.content_hash.clone(),
        arguments: recorded_arguments(&req.arguments),
        idempotency_key: req.idempotency_key.clone(),
        request_hash,
        endpoint_id,
        body: body.into(),
        approval_reason,
        lease: state.engine.lease(),
        fanout: crate::events::Fanout::Among(subscribers),
        rules: state
            .rules
            .context(&state.db, &tenant_id, &state.gateway.validators)
            .await?,
        now,
    };
    let mut expired_key_cleared = false;
    let persisted = loop {
        match state.invocation_writes.submit(job.clone()).await {
            Ok(p) => break p,
            Err(e) if e.is_unique_violation() => {
                // The key was used before: answer like that call did.
                let key = req.idempotency_key.clone().unwrap_or_default();
                let hashes = [
                    self::request_hash(&req.action, &req.arguments),
                    legacy_request_hash(&req.action, &req.arguments),
                ];
                if let Some(existing) =
                    find_idempotent(state, &tenant_id, &caller.principal(), &key, &hashes).await?
                {
                    return replay(state, action, existing, (req.wait, req.repeat)).await;
                }
                if expired_key_cleared {
                    return Err(ApiError::internal("idempotent invocation vanished"));
                }
                // Its record expired (keys last 24 hours) but the purge has not reached it yet.
                state
                    .db
                    .execute(
                        "DELETE FROM idempotency_records \
                         WHERE tenant_id = $1 AND scope = $2 AND key = $3 AND expires_at <= $4",
                        args![&tenant_id, caller.principal(), &key, now_ms()],
                    )
                    .await?;
                expired_key_cleared = true;
            }
            Err(e) => return Err(e.into()),
        }
    };
    metrics::counter!("opsiq_invocations_total", "status" => if pending_approval { "pending_approval" } else { "queued" })
        .increment(1);

    let waits = action.declaration.mode == Mode::Sync || req.wait.is_some();
    let watch = persisted
        .job
        .as_ref()
        .filter(|_| waits)
        .map(|j| state.engine.watch(&j.id));
    state
        .engine
        .dispatch(persisted.job.into_iter().chain(persisted.raised).collect())
        .await;
    let Some(watch) = watch else {
        // Nothing to wait for: the row as written is the answer (no read back).
        return Ok(persisted.row);
    };
    let budget = wait_for(action, req.wait);
    if state.server_lock.is_sole() {
        let _ = tokio::time::timeout(budget, watch).await;
    } else {
        // Another process may send the call (a retry it claimed, a lease it took over) and only
        // its own waiters hear of it: look at the record too, less often the longer it takes.
        let settled_elsewhere = async {
            let mut pause = SETTLED_ELSEWHERE_FIRST_LOOK;
            loop {
                tokio::time::sleep(pause).await;
                match load(state, &tenant_id, &invocation_id).await {
                    Ok(Some(row)) if row.is_terminal() => return,
                    Ok(_) => {}
                    // A failed look is no news: the watch or the deadline ends the wait.
                    Err(_) => std::future::pending::<()>().await,
                }
                pause = (pause * 2).min(SETTLED_ELSEWHERE_MOST_PAUSE);
            }
        };
        let _ = tokio::time::timeout(budget, async {
            tokio::select! {
                _ = watch => {}
                () = settled_elsewhere => {}
            }
        })
        .await;
    }
    load(state, &tenant_id, &invocation_id)
        .await?
        .ok_or_else(|| ApiError::internal("invocation vanished"))
}

/// How long a waiting call trusts its own process to settle it before it also polls the record:
/// most calls are settled by the process that took them, well within this.
const SETTLED_ELSEWHERE_FIRST_LOOK: Duration = Duration::from_millis(200);

/// The longest pause between looks at a waiting call's record (the pauses double up to it).
const SETTLED_ELSEWHERE_MOST_PAUSE: Duration = Duration::from_secs(1);

fn wait_for(action: &Action, extra: Option<Duration>) -> Duration {
    let declared = Duration::from_millis(action.declaration.timeout_ms);
    match (action.declaration.mode, extra) {
        (Mode::Sync, Some(w)) => declared.max(w),
        (Mode::Sync, None) => declared,
        (Mode::Async, Some(w)) => w,
        (Mode::Async, None) => Duration::ZERO,
    }
}

/// The answer to a repeated call ([`Repeat::AsFirst`]): the first call's. An `async` call that
/// did not ask to wait was answered at once with the status it started in (202 `queued`, or
/// `pending_approval`), so a repeat is answered the same way whatever became of it since, except
/// that a denial is answered as one. Otherwise, and always for [`Repeat::AsItStands`], the repeat
/// waits like the first call did and answers where the call stands then.
async fn replay(
    state: &AppState,
    action: &Action,
    existing: InvocationRow,
    (extra, repeat): (Option<Duration>, Repeat),
) -> Result<InvocationRow, ApiError> {
    if action.declaration.mode != Mode::Async || extra.is_some() || repeat == Repeat::AsItStands {
        return wait_if_sync(state, action, existing, extra).await;
    }
    // A call a person denied answers the denial (403): a model retrying it must learn that it
    // will not run, not that it still waits.
    if existing.status == "denied" {
        return Ok(existing);
    }
    let held: Option<(String,)> = state
        .db
        .fetch_optional(
            "SELECT id FROM approvals WHERE tenant_id = $1 AND invocation_id = $2",
            args![&existing.tenant_id, &existing.id],
        )
        .await?;
    Ok(InvocationRow {
        status: if held.is_some() {
            "pending_approval"
        } else {
            "queued"
        }
        .to_string(),
        result: None,
        error: None,
        ..existing
    })
}

/// For an idempotent replay of a sync call that is still in flight, wait like the first call did.
async fn wait_if_sync(
    state: &AppState,
    action: &Action,
    existing: InvocationRow,
    extra: Option<Duration>,
) -> Result<InvocationRow, ApiError> {
    let budget = wait_for(action, extra);
    if existing.is_terminal() || existing.status == "pending_approval" || budget.is_zero() {
        return Ok(existing);
    }
    poll_until_settled(state, &existing.tenant_id, &existing.id, budget).await
}

/// Polls an invocation until it is settled or `budget` runs out.
pub async fn poll_until_settled(
    state: &AppState,
    tenant_id: &str,
    id: &str,
    budget: Duration,
) -> Result<InvocationRow, ApiError> {
    let deadline = tokio::time::Instant::now() + budget;
    loop {
        let row = load(state, tenant_id, id)
            .await?
            .ok_or_else(|| ApiError::not_found("invocation"))?;
        if row.is_terminal() || tokio::time::Instant::now() >= deadline {
            return Ok(row);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Loads an invocation of a tenant.
pub async fn load(state: &AppState, tenant_id: &str, id: &str) -> Result<Option<InvocationRow>, DbError> {
    Ok(state
        .db
        .fetch_optional(
            "SELECT * FROM invocations WHERE tenant_id = $1 AND id = $2",
            args![tenant_id, id],
        )
        .await?)
}

/// Checks arguments against the action's input schema (compiled once per version); the
/// problems, each with its JSON pointer, or none.
pub(crate) fn validate_arguments(
    state: &AppState,
    tenant_id: &str,
    action: &Action,
    arguments: &Value,
) -> Result<Vec<ErrorDetail>, ApiError> {
    if !arguments.is_object() {
        return Ok(vec![ErrorDetail {
            path: "/".into(),
            message: "arguments must be a JSON object with the fields the tool's input schema describes"
                .into(),
        }]);
    }
    let validator = state
        .gateway
        .validators
        .get(
            tenant_id,
            &action.declaration.name,
            action.version,
            Which::Input,
            &action.declaration.input_schema,
        )
        .map_err(ApiError::internal)?;
    Ok(crate::registry::model::schema_errors(&validator, arguments))
}

/// SHA-256 over the action name and the canonical arguments (sorted keys, and a number with no
/// fraction written as an integer: JSON Schema holds `7` and `7.0` to be the same value, so a
/// retry that spells one as the other is the same call).
fn request_hash(action: &str, arguments: &Value) -> String {
    let canonical = crate::json::canonical_text(arguments);
    crypto::sha256_hex(format!("{action}\n{canonical}").as_bytes())
}

/// The hash an earlier version stored for the same call (arguments as they were spelled, so a
/// `7.0` not as `7`): a retry across the upgrade, or through a replica not yet upgraded, is still
/// the same call.
fn legacy_request_hash(action: &str, arguments: &Value) -> String {
    crypto::sha256_hex(format!("{action}\n{arguments}").as_bytes())
}

async fn find_idempotent(
    state: &AppState,
    tenant_id: &str,
    principal: &str,
    key: &str,
    hashes: &[String],
) -> Result<Option<InvocationRow>, ApiError> {
    let row: Option<(String, String)> = state
        .db
        .fetch_optional(
            "SELECT request_hash, resource_id FROM idempotency_records \
             WHERE tenant_id = $1 AND scope = $2 AND key = $3 AND expires_at > $4",
            args![tenant_id, principal, key, now_ms()],
        )
        .await?;
    let Some((stored_hash, invocation_id)) = row else {
        return Ok(None);
    };
    if !hashes.contains(&stored_hash) {
        return Err(ApiError::conflict(
            "idempotency_conflict",
            "this Idempotency-Key was already used with different arguments; use a new key for a new call",
        ));
    }
    Ok(load(state, tenant_id, &invocation_id).await?)
}

/// The body the action's endpoint receives (whole numbers in the arguments as integers, see
/// [`crate::json::whole_numbers_as_integers`]).
pub fn action_request_body(
    invocation_id: &str,
    action: &Action,
    arguments: &Value,
    caller: &Caller,
    now: i64,
) -> String {
    let agent = match caller {
        Caller::Agent(p) => json!({"id": p.agent_id, "roles": p.roles}),
        Caller::Rule { rule_id, .. } => json!({"id": format!("rule:{rule_id}"), "roles": []}),
    };
    let sent_on = crate::json::whole_numbers_as_integers(arguments);
    json!({
        "id": invocation_id,
        "type": "action.invoke",
        "action": {"name": action.declaration.name, "version": action.version},
        "arguments": sent_on.as_ref().unwrap_or(arguments),
        "agent": agent,
        "requested_at": rfc3339(now),
    })
    .to_string()
}

/// Arguments as an invocation records them: as sent on (see [`action_request_body`]).
fn recorded_arguments(arguments: &Value) -> String {
    crate::json::whole_numbers_as_integers(arguments)
        .as_ref()
        .unwrap_or(arguments)
        .to_string()
}

/// The idempotency key the endpoint sees: derived from the caller's key, stable across retries.
pub(crate) fn derived_key(
    tenant_id: &str,
    principal: &str,
    key: Option<&str>,
    invocation_id: &str,
) -> String {
    match key {
        Some(k) => format!(
            "idem_{}",
            &crypto::sha256_hex(format!("{tenant_id}\n{principal}\n{k}").as_bytes())[..32]
        ),
        None => format!("idem_{}", &invocation_id[4..]),
    }
}

/// A settled-at-once invocation (refused or failed before any delivery).
struct Refusal<'a> {
    caller: &'a Caller,
    action_name: &'a str,
    action: Option<&'a Action>,
    arguments: &'a Value,
    idempotency_key: Option<&'a str>,
    status: &'a str,
    error: Value,
}

const REFUSAL_SQL: &str = "INSERT INTO invocations (id, tenant_id, principal, agent_id, roles, action_name, \
    action_version, action_hash, arguments, status, error, idempotency_key, created_at, updated_at, completed_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13, $13)";

impl Refusal<'_> {
    fn args(&self, id: &str, now: i64) -> Vec<crate::db::Arg> {
        metrics::counter!("opsiq_invocations_total", "status" => self.status.to_string()).increment(1);
        args![
            id,
            self.caller.tenant_id(),
            self.caller.principal(),
            self.caller.agent_id(),
            serde_json::to_string(&self.caller.roles()).unwrap_or_default(),
            self.action_name,
            self.action.map(|a| a.version),
            self.action.map(|a| a.content_hash.clone()),
            recorded_arguments(self.arguments),
            self.status,
            self.error.to_string(),
            self.idempotency_key,
            now
        ]
    }
}

/// A rule's call, as recorded when it is refused.
struct RuleCall<'a> {
    caller: &'a Caller,
    action_name: &'a str,
    arguments: &'a Value,
    key: &'a str,
    invocation_id: &'a str,
    now: i64,
}

impl RuleCall<'_> {
    /// Records the call as refused before anything was sent (`failed` or `denied`).
    async fn refuse(
        &self,
        tx: &mut Tx,
        action: Option<&Action>,
        status: &'static str,
        error: Value,
    ) -> Result<RuleInvocation, DbError> {
        let refusal = Refusal {
            caller: self.caller,
            action_name: self.action_name,
            action,
            arguments: self.arguments,
            idempotency_key: Some(self.key),
            status,
            error,
        };
        tx.execute(REFUSAL_SQL, refusal.args(self.invocation_id, self.now))
            .await?;
        Ok(RuleInvocation {
            invocation_id: self.invocation_id.to_string(),
            status,
            error: Some(refusal.error),
            jobs: Vec::new(),
        })
    }
}

/// Why `caller` may not invoke `action` (`scope_denied` or `role_denied`, and a message naming
/// what is missing), if it may not: an agent needs both a scope and a role that allow it.
async fn authorization_refusal(
    state: &AppState,
    caller: &Caller,
    tenant_id: &str,
    action: &str,
) -> Result<Option<(&'static str, String)>, ApiError> {
    let Caller::Agent(agent) = caller else {
        return Ok(None);
    };
    if !scope_allows(&agent.scopes, action) {
        let message = format!(
            "this token's scopes [{}] do not include invoke:{action} (or a glob covering it)",
            agent.scopes.join(" "),
        );
        return Ok(Some(("scope_denied", message)));
    }
    let decision = state
        .policy
        .check(
            &state.db,
            agent.policy_version,
            (tenant_id, &agent.subjects(), action),
        )
        .await?;
    Ok(match decision {
        Decision::Deny(message) => Some(("role_denied", message)),
        Decision::Allow => None,
    })
}

/// Before a call is refused for its arguments or its action's state: if its Idempotency-Key
/// was used before, the call is answered as the key says instead — the earlier call's answer for
/// the same arguments, a 409 `idempotency_conflict` for others — and no refusal is recorded.
/// (The accepted path finds a used key by the unique index, without this read; refusals are
/// rare enough to afford it.) Authorization refusals (scope, role) come first and stand.
async fn answer_for_used_key(
    state: &AppState,
    caller: &Caller,
    action: Option<&Action>,
    req: &InvokeRequest,
) -> Result<Option<InvocationRow>, ApiError> {
    let Some(key) = &req.idempotency_key else {
        return Ok(None);
    };
    let hashes = [
        request_hash(&req.action, &req.arguments),
        legacy_request_hash(&req.action, &req.arguments),
    ];
    match find_idempotent(state, caller.tenant_id(), &caller.principal(), key, &hashes).await? {
        Some(earlier) => match action {
            Some(action) => replay(state, action, earlier, (req.wait, req.repeat))
                .await
                .map(Some),
            None => Ok(Some(earlier)),
        },
        None => Ok(None),
    }
}

async fn record_refusal(
    state: &AppState,
    caller: &Caller,
    action: &Action,
    req: &InvokeRequest,
    status: &str,
    code: &str,
    message: &str,
) -> Result<(), ApiError> {
    let refusal = Refusal {
        caller,
        action_name: &req.action,
        action: Some(action),
        arguments: &req.arguments,
        idempotency_key: req.idempotency_key.as_deref(),
        status,
        error: json!({"code": code, "message": message}),
    };
    state
        .db
        .execute(REFUSAL_SQL, refusal.args(&ids::new_id("inv"), now_ms()))
        .await?;
    Ok(())
}

/// What a rule's `invoke` output did.
#[derive(Debug)]
pub struct RuleInvocation {
    /// The recorded invocation.
    pub invocation_id: String,
    /// `queued`, `pending_approval`, `denied` (by a guard) or `failed`.
    pub status: &'static str,
    /// Why it failed, when it did.
    pub error: Option<Value>,
    /// The deliveries to hand to the worker.
    pub jobs: Vec<outbox::Job>,
}

/// What a rule's call of an action comes to before anything is written, as its invocation and
/// its dry run (`POST /v1/rules/test`) both see it.
pub enum RuleCallVerdict {
    /// Recorded with `status` (`failed` or `denied`) and `error`; nothing is sent.
    Refused {
        /// The action, when there is an enabled one.
        action: Option<Action>,
        /// `failed` or `denied`.
        status: &'static str,
        /// `{"code","message","details"}`.
        error: Value,
    },
    /// Sent, or first held for a person's approval when `approval_reason` says why.
    Allowed {
        /// The action called.
        action: Action,
        /// Why a person must approve it first, if they must.
        approval_reason: Option<String>,
    },
}

/// Judges a rule's call: the action must exist and be enabled, the arguments fit its input
/// schema, an endpoint be set, and its guards (checked for a rule as for an agent, with the
/// rule as the caller and no roles) allow it or ask for approval.
pub fn judge_rule_call(
    validators: &crate::registry::validators::Validators,
    tenant_id: &str,
    action: Option<Action>,
    action_name: &str,
    arguments: &Value,
    caller: &Caller,
) -> RuleCallVerdict {
    let failure = |code: &str, message: String, details: Vec<ErrorDetail>| json!({"code": code, "message": message, "details": details});
    let refused = |action: Option<Action>, status, error| RuleCallVerdict::Refused {
        action,
        status,
        error,
    };
    let Some(action) = action.filter(|a| a.declaration.enabled) else {
        let message = format!("there is no enabled action named `{action_name}`");
        return refused(None, "failed", failure("unknown_action", message, Vec::new()));
    };
    if !arguments.is_object() {
        let message = format!("the arguments for {} must be an object", action.declaration.name);
        return refused(
            Some(action),
            "failed",
            failure("validation_failed", message, Vec::new()),
        );
    }
    let validator = match validators.get(
        tenant_id,
        &action.declaration.name,
        action.version,
        Which::Input,
        &action.declaration.input_schema,
    ) {
        Ok(v) => v,
        Err(e) => return refused(Some(action), "failed", failure("internal_error", e, Vec::new())),
    };
    let details = crate::registry::model::schema_errors(&validator, arguments);
    if !details.is_empty() {
        let message = format!("the templated arguments for {action_name} do not match its input schema");
        return refused(
            Some(action),
            "failed",
            failure("validation_failed", message, details),
        );
    }
    if action.declaration.endpoint_id.is_none() {
        let message = format!("{action_name} has no endpoint configured");
        return refused(
            Some(action),
            "failed",
            failure("action_unavailable", message, Vec::new()),
        );
    }
    let guards = match validators.guards(tenant_id, action_name, action.version, &action.declaration.guards) {
        Ok(guards) => guards,
        Err(e) => {
            tracing::error!(error = %e, "refusing a rule's call");
            return refused(Some(action), "failed", failure("internal_error", e, Vec::new()));
        }
    };
    let mut approval_reason = always_approve(&action);
    match crate::registry::guards::decide(
        guards.as_deref().unwrap_or_default(),
        arguments,
        &caller.principal(),
        &[],
        action_name,
        action.version,
    ) {
        Some((Verdict::Deny, reason)) => {
            let message = format!("a guard on {action_name} refused this call: {reason}");
            return refused(
                Some(action),
                "denied",
                failure("guard_denied", message, Vec::new()),
            );
        }
        Some((Verdict::RequireApproval, reason)) => approval_reason = Some(reason.to_string()),
        Some((Verdict::Allow, _)) | None => {}
    }
    RuleCallVerdict::Allowed {
        action,
        approval_reason,
    }
}

/// Invokes an action for a rule inside the transaction recording the triggering event: no scope
/// or role check (an admin wrote the rule), but the arguments are validated like any call and
/// everything is recorded. `key` makes the call idempotent per event and output.
#[allow(clippy::too_many_arguments)]
pub async fn invoke_for_rule(
    tx: &mut Tx,
    validators: &crate::registry::validators::Validators,
    tenant_id: &str,
    rule_id: &str,
    key: &str,
    action_name: &str,
    arguments: &Value,
    lease: &Lease,
    now: i64,
) -> Result<RuleInvocation, DbError> {
    let caller = Caller::Rule {
        tenant_id: tenant_id.to_string(),
        rule_id: rule_id.to_string(),
    };
    let invocation_id = ids::new_id("inv");
    let action = store::get_in(tx, tenant_id, action_name).await?;
    let call = RuleCall {
        caller: &caller,
        action_name,
        arguments,
        key,
        invocation_id: &invocation_id,
        now,
    };
    let (action, approval_reason) =
        match judge_rule_call(validators, tenant_id, action, action_name, arguments, &caller) {
            RuleCallVerdict::Refused {
                action,
                status,
                error,
            } => return call.refuse(tx, action.as_ref(), status, error).await,
            RuleCallVerdict::Allowed {
                action,
                approval_reason,
            } => (action, approval_reason),
        };
    let endpoint_id = action.declaration.endpoint_id.clone().unwrap_or_default();
    let live: Option<(String,)> = tx
        .fetch_optional(
            "SELECT id FROM endpoints WHERE tenant_id = $1 AND id = $2 AND enabled = $3 AND deleted_at IS NULL",
            args![tenant_id, &endpoint_id, true],
        )
        .await?;
    if live.is_none() {
        let error = json!({"code": "action_unavailable", "message": endpoint_unavailable(action_name), "details": []});
        return call.refuse(tx, Some(&action), "failed", error).await;
    }
    let pending_approval = approval_reason.is_some();
    let persist = PersistInvocation {
        tenant_id: tenant_id.to_string(),
        invocation_id: invocation_id.clone(),
        principal: caller.principal(),
        agent_id: None,
        token_id: None,
        roles: Vec::new(),
        action_name: action_name.to_string(),
        action_version: action.version,
        action_hash: action.content_hash.clone(),
        arguments: recorded_arguments(arguments),
        idempotency_key: Some(key.to_string()),
        request_hash: request_hash(action_name, arguments),
        endpoint_id,
        body: action_request_body(&invocation_id, &action, arguments, &caller, now).into(),
        approval_reason,
        lease: lease.clone(),
        fanout: crate::events::Fanout::Lookup,
        rules: None,
        now,
    };
    let persisted = write_all(std::slice::from_ref(&persist), tx)
        .await?
        .pop()
        .ok_or_else(|| DbError::Batch("the invocation was not written".into()))?;
    metrics::counter!("opsiq_invocations_total", "status" => if pending_approval { "pending_approval" } else { "queued" })
        .increment(1);
    Ok(RuleInvocation {
        invocation_id,
        status: if pending_approval {
            "pending_approval"
        } else {
            "queued"
        },
        error: None,
        jobs: persisted.job.into_iter().chain(persisted.raised).collect(),
    })
}

/// Why a call cannot go to its action's endpoint: it was disabled (by an admin, a `410 Gone` or
/// five days of failures) or deleted.
pub fn endpoint_unavailable(action_name: &str) -> String {
    format!(
        "{action_name}'s endpoint is disabled or deleted; an admin must enable it or point the action at another endpoint"
    )
}

/// The approval reason of an action that holds every call for a person, if it does.
fn always_approve(action: &Action) -> Option<String> {
    (action.declaration.approval == Approval::Always)
        .then(|| "the action requires approval for every call".to_string())
}

/// The writes of an accepted invocation, run by the group-commit writer.
#[derive(Clone)]
pub struct PersistInvocation {
    tenant_id: String,
    invocation_id: String,
    principal: String,
    agent_id: Option<String>,
    /// The gateway-minted token of the call, kept with an approval request.
    token_id: Option<String>,
    roles: Vec<String>,
    action_name: String,
    action_version: i64,
    action_hash: String,
    arguments: String,
    idempotency_key: Option<String>,
    request_hash: String,
    endpoint_id: String,
    body: Arc<str>,
    /// Why a person must approve the call first, when one must.
    approval_reason: Option<String>,
    lease: Lease,
    /// Who receives the events it raises (`action.invoked`, `approval.requested`).
    fanout: crate::events::Fanout,
    /// The rules those events run (none for a rule's own invocation, which would loop).
    rules: Option<Arc<crate::rules::apply::RuleContext>>,
    now: i64,
}

/// What persisting an invocation produced: its delivery, if one was created.
pub struct Persisted {
    job: Option<outbox::Job>,
    /// Deliveries of events raised meanwhile (`approval.requested`).
    raised: Vec<outbox::Job>,
    /// The invocation as written.
    row: InvocationRow,
}

impl Job for PersistInvocation {
    type Output = Persisted;

    fn write_batch<'a>(
        jobs: &'a [Self],
        tx: &'a mut Tx,
    ) -> crate::db::batch::BatchFuture<'a, Vec<Persisted>> {
        Box::pin(write_all(jobs, tx))
    }
}

const IDEMPOTENCY_INSERT: &str = "INSERT INTO idempotency_records \
    (tenant_id, scope, key, request_hash, resource_id, created_at, expires_at) VALUES";
const INVOCATION_INSERT: &str = "INSERT INTO invocations (id, tenant_id, principal, agent_id, roles, action_name, \
    action_version, action_hash, arguments, status, idempotency_key, delivery_id, created_at, updated_at) VALUES";

/// Writes accepted invocations with a few multi-row statements: their idempotency records,
/// deliveries (or approval requests), `action.invoked` events and the invocations themselves.
async fn write_all(jobs: &[PersistInvocation], tx: &mut Tx) -> Result<Vec<Persisted>, DbError> {
    let Some(first) = jobs.first() else {
        return Ok(Vec::new());
    };
    // One lease and one clock for the deliveries and events: the jobs came moments apart.
    let (lease, now) = (&first.lease, first.now);
    let keys = jobs
        .iter()
        .filter_map(PersistInvocation::idempotency_row)
        .collect();
    crate::db::insert_rows(tx, IDEMPOTENCY_INSERT, 7, keys).await?;

    let mut events = Vec::with_capacity(jobs.len());
    let mut event_owners = Vec::with_capacity(jobs.len());
    let mut deliveries = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        if let Some(reason) = &job.approval_reason {
            let approval_id = ids::new_id("apr");
            tx.defer(
                "INSERT INTO approvals (id, tenant_id, invocation_id, status, reason, created_at, token_id) \
                 VALUES ($1, $2, $3, 'pending', $4, $5, $6)",
                args![
                    &approval_id,
                    &job.tenant_id,
                    &job.invocation_id,
                    reason,
                    job.now,
                    job.token_id.clone()
                ],
            )
            .await?;
            events.push(job.event(
                "approval.requested",
                json!({"approval_id": approval_id, "invocation_id": job.invocation_id,
                    "action": job.action_name, "principal": job.principal, "reason": reason}),
            ));
            event_owners.push(i);
        } else {
            deliveries.push(job.delivery());
        }
    }
    let mut delivered = outbox::insert(tx, deliveries, lease, now).await?.into_iter();
    let own: Vec<Option<outbox::Job>> = jobs
        .iter()
        .map(|job| {
            if job.approval_reason.is_some() {
                None
            } else {
                delivered.next()
            }
        })
        .collect();

    for (i, job) in jobs.iter().enumerate() {
        events.push(job.event(
            "action.invoked",
            json!({"invocation_id": job.invocation_id, "action": job.action_name,
                "version": job.action_version, "principal": job.principal, "status": job.status()}),
        ));
        event_owners.push(i);
    }
    let mut raised: Vec<Vec<outbox::Job>> = vec![Vec::new(); jobs.len()];
    let recorded = crate::events::record_many(tx, &events, lease, now).await?;
    for (owner, event) in event_owners.into_iter().zip(recorded) {
        raised[owner].extend(event.deliveries);
    }

    let rows: Vec<InvocationRow> = jobs
        .iter()
        .zip(&own)
        .map(|(job, delivery)| job.row(delivery.as_ref().map(|d| d.id.clone())))
        .collect();
    crate::db::insert_rows(
        tx,
        INVOCATION_INSERT,
        14,
        rows.iter().map(invocation_values).collect(),
    )
    .await?;
    Ok(own
        .into_iter()
        .zip(raised)
        .zip(rows)
        .map(|((job, raised), row)| Persisted { job, raised, row })
        .collect())
}

fn invocation_values(row: &InvocationRow) -> Vec<crate::db::Arg> {
    args![
        &row.id,
        &row.tenant_id,
        &row.principal,
        row.agent_id.clone(),
        &row.roles,
        &row.action_name,
        row.action_version,
        row.action_hash.clone(),
        &row.arguments,
        &row.status,
        row.idempotency_key.clone(),
        row.delivery_id.clone(),
        row.created_at,
        row.updated_at
    ]
}

impl PersistInvocation {
    fn status(&self) -> &'static str {
        if self.approval_reason.is_some() {
            "pending_approval"
        } else {
            "queued"
        }
    }

    fn idempotency_row(&self) -> Option<Vec<crate::db::Arg>> {
        let key = self.idempotency_key.as_ref()?;
        Some(args![
            &self.tenant_id,
            &self.principal,
            key,
            &self.request_hash,
            &self.invocation_id,
            self.now,
            self.now + 24 * 3600 * 1000
        ])
    }

    fn delivery(&self) -> NewDelivery {
        NewDelivery {
            tenant_id: self.tenant_id.clone(),
            endpoint_id: self.endpoint_id.clone(),
            kind: outbox::Kind::Action,
            event_id: None,
            invocation_id: Some(self.invocation_id.clone()),
            label: self.action_name.clone(),
            idempotency_key: Some(derived_key(
                &self.tenant_id,
                &self.principal,
                self.idempotency_key.as_deref(),
                &self.invocation_id,
            )),
            body: self.body.clone(),
        }
    }

    fn event(&self, event_type: &str, data: Value) -> crate::events::NewEvent {
        crate::events::NewEvent {
            tenant_id: self.tenant_id.clone(),
            event_type: event_type.into(),
            data,
            idempotency_key: None,
            source: "system".into(),
            depth: 0,
            emitted: Default::default(),
            fanout: self.fanout.clone(),
            rules: self.rules.clone(),
        }
    }

    fn row(&self, delivery_id: Option<String>) -> InvocationRow {
        InvocationRow {
            id: self.invocation_id.clone(),
            tenant_id: self.tenant_id.clone(),
            principal: self.principal.clone(),
            agent_id: self.agent_id.clone(),
            roles: serde_json::to_string(&self.roles).unwrap_or_default(),
            action_name: self.action_name.clone(),
            action_version: Some(self.action_version),
            action_hash: Some(self.action_hash.clone()),
            arguments: self.arguments.clone(),
            status: self.status().to_string(),
            result: None,
            error: None,
            idempotency_key: self.idempotency_key.clone(),
            delivery_id,
            created_at: self.now,
            updated_at: self.now,
            completed_at: None,
        }
    }
}
