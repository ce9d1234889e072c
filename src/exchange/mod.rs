//! One LLM exchange, request to response: the filter's whole behaviour for an HTTP stream.
//!
//! Request headers decide whether the stream is an LLM call (a POST to a known API path);
//! if it is, the request is held until its body is complete (the plugin config must set
//! `allow_on_headers_stop_iteration`), the body is parsed and its prompt counted, and the
//! request goes on with `x-tokenfuse-prompt-tokens` promised for the response. The
//! response is read without delaying it: JSON bodies are copied chunk by chunk (up to a cap)
//! and their `usage` read at the end; SSE streams are decoded chunk by chunk. When the
//! stream ends — cleanly, cut by the upstream, or abandoned by the client — the exchange is
//! settled once, into stats.
//!
//! Every outcome is explicit: unreadable request bodies follow the configured
//! [`MalformedPolicy`]; anything the filter cannot read in a response is counted as a parse
//! failure and settled with the filter's own counts.

pub mod admin;
#[cfg(any(test, feature = "testkit"))]
pub mod scenario;

use std::rc::Rc;

use self::admin::AdminStep;
use crate::budget::ledger;
use crate::budget::plan::{self, BudgetKey, Facts, Plan, RateHeaders, Rejection, Reservation};
use crate::budget::window::go_duration;
use crate::budget::{self, OversizeAction, Priority, Standing, Unit};
use crate::config::{AbandonedPolicy, FailureMode, MalformedPolicy};
use crate::filter::Filter;
use crate::global;
use crate::global::rls;
use crate::host::{Host, Level};
use crate::llm::api::{self, ApiKind, RequestBody, RequestError};
use crate::llm::prompt::{count_prompt, scale, ImageCosts, PromptCount};
use crate::llm::rewrite;
use crate::llm::sse::{SseDecoder, StreamMeter};
use crate::llm::truncate;
use crate::llm::usage::{usage_from_json, UsageError, UsageReport};
use crate::stats::Stat;
use crate::tokenizer::{ModelCounting, TextCounter};

/// Response header carrying the filter's prompt count.
pub const PROMPT_TOKENS_HEADER: &str = "x-tokenfuse-prompt-tokens";
/// Response header naming budgets at or past their warning threshold.
pub const WARNING_HEADER: &str = "x-tokenfuse-budget-warning";
/// Response header naming the model a rerouted request was served by.
pub const REROUTED_HEADER: &str = "x-tokenfuse-rerouted-to";

/// What the glue tells Envoy after a callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Let the stream go on.
    Continue,
    /// Hold it (headers: until the body is complete; body: keep buffering).
    Pause,
}

/// One HTTP stream through the filter.
pub struct Exchange {
    filter: Rc<Filter>,
    id: u32,
    phase: Phase,
    /// Request body bytes buffered so far (for trailers, which end the body without a size).
    buffered: usize,
}

enum Phase {
    /// Not an LLM call, or already settled: the filter stays out of the way.
    Idle,
    /// An LLM call whose request body is still arriving, with what its headers said.
    AwaitingBody {
        kind: ApiKind,
        path: String,
        who: Box<Identity>,
    },
    /// Admitted locally, held while the rate limit service judges the global budgets.
    Checking {
        call: Box<Call>,
        checks: Vec<global::Check>,
    },
    /// Forwarded; the response is being read.
    Forwarded(Box<Call>),
    /// An admin top-up whose body is still arriving.
    AdminBody,
}

/// What the filter knows about a forwarded LLM call.
struct Call {
    kind: ApiKind,
    /// The request path (an Azure reroute rewrites its deployment).
    path: String,
    model_tag: String,
    counting: ModelCounting,
    prompt: PromptCount,
    response: Response,
    cluster: Option<String>,
    /// The model that serves the request (the cheaper one when rerouted).
    served_model: String,
    /// What the budgets hold for this request until it settles.
    reservations: Vec<Reservation>,
    rate: Option<RateHeaders>,
    warnings: Vec<String>,
    rerouted: bool,
    priority: Priority,
    /// The `tenant` stat tag, when tenant tagging is on.
    tenant_tag: Option<String>,
    /// What the rate limit service holds for this request, per global budget.
    holds: Vec<global::Hold>,
    /// The admission decision, counted once every budget has had its say.
    decision: Option<&'static str>,
}

/// What the request headers say about who is asking, read in the headers callback: once
/// the headers have gone on (count-and-reject mode), Envoy no longer lets the filter read
/// them.
struct Identity {
    /// The identity per budget, in budget order.
    budget_ids: Vec<String>,
    /// The identity per global budget, in order.
    global_ids: Vec<String>,
    priority: Priority,
    /// Seed of the deterministic degradation pick (Envoy's `x-request-id`).
    request_id: Option<String>,
    tenant_tag: Option<String>,
}

/// What a settled exchange is billed.
enum Billed {
    /// Nothing: the provider answered with an error, or not at all.
    Nothing,
    /// Known usage.
    Usage { source: Source, usage: UsageReport },
    /// The prompt is known, the output is not (an unreadable response): the budgets keep
    /// the reservation, the stats record the prompt.
    Unknown,
}

enum Response {
    /// No response headers yet.
    Pending,
    /// A non-streaming body, copied as it passes.
    Json { body: Vec<u8>, overflowed: bool },
    /// An event stream, decoded as it passes.
    Stream {
        decoder: SseDecoder,
        meter: StreamMeter,
    },
    /// The provider answered with an error (nothing is billed).
    UpstreamError { status: u32 },
    /// A body the filter cannot read (content-encoded).
    Unreadable,
}

/// How a settled exchange's tokens are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Provider,
    Counted,
}

impl Source {
    fn tag(self) -> &'static str {
        match self {
            Source::Provider => "provider",
            Source::Counted => "counted",
        }
    }
}

impl Exchange {
    /// A new exchange for the HTTP context `id`.
    pub fn new(filter: Rc<Filter>, id: u32) -> Self {
        Exchange {
            filter,
            id,
            phase: Phase::Idle,
            buffered: 0,
        }
    }

    /// Request headers arrived.
    pub fn on_request_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Action {
        match admin::on_request_headers(host, &self.filter.config, end_of_stream) {
            AdminStep::NotAdmin => {}
            AdminStep::Replied => return Action::Pause,
            AdminStep::AwaitBody => {
                self.phase = Phase::AdminBody;
                return Action::Pause;
            }
        }
        // The reroute header is the filter's to set, on any request: a client must not pick
        // the economy route for itself (an LLM call would get the cheaper model's budget
        // treatment; any other request would reach the economy cluster).
        let reroute_header = &self.filter.config.reroute.header;
        if host.request_header(reroute_header).is_some() {
            host.set_request_header(reroute_header, None);
        }
        let method = host.request_header(":method").unwrap_or_default();
        let path = host.request_header(":path").unwrap_or_default();
        let kind = match ApiKind::from_path(&path) {
            Some(kind) if method.eq_ignore_ascii_case("POST") => kind,
            _ => {
                host.counter_add(Stat::new("passthrough").tag("reason", "not_llm").name(), 1);
                return Action::Continue;
            }
        };
        if end_of_stream {
            return self.malformed(host, kind, &RequestError::Empty);
        }
        if let Some(encoding) = host.request_header("content-encoding") {
            if !encoding.eq_ignore_ascii_case("identity") {
                return self.malformed(host, kind, &RequestError::Encoded);
            }
        }
        // Ask the provider for an uncompressed response: its usage must be readable.
        host.set_request_header("accept-encoding", None);
        let config = &self.filter.config;
        let who = Identity {
            budget_ids: config
                .budgets
                .iter()
                .map(|b| plan::identity(host, b))
                .collect(),
            global_ids: config
                .global_budgets
                .iter()
                .map(|b| crate::budget::identity::of_request(host, &b.key))
                .collect(),
            priority: plan::priority(host, config),
            request_id: host.request_header("x-request-id"),
            tenant_tag: config.tenant_tag.as_ref().map(|source| {
                self.filter
                    .tenant_tag(&crate::budget::identity::of_request(host, source))
            }),
        };
        self.phase = Phase::AwaitingBody {
            kind,
            path,
            who: Box::new(who),
        };
        if self.filter.config.hold_request_headers {
            Action::Pause
        } else {
            // Count-and-reject mode: the headers go on now, the body is still held (in
            // on_request_body) until it is complete and judged.
            Action::Continue
        }
    }

    /// A request body chunk arrived; `body_size` is everything buffered so far.
    pub fn on_request_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        self.buffered = body_size;
        if let Phase::AdminBody = self.phase {
            if !end_of_stream {
                return Action::Pause;
            }
            let body = host.request_body(body_size).unwrap_or_default();
            admin::on_topup_body(host, &self.filter.config, &body);
            self.phase = Phase::Idle;
            return Action::Pause;
        }
        if !matches!(self.phase, Phase::AwaitingBody { .. }) {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let Phase::AwaitingBody { kind, path, who } =
            std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return Action::Continue;
        };
        let original = host.request_body(body_size).unwrap_or_default();
        let parsed = match api::parse_request(kind, &original) {
            Ok(parsed) => parsed,
            Err(e) => return self.malformed(host, kind, &e),
        };
        // On an Azure path the deployment is what is served and billed, whatever the body
        // says; elsewhere the body's model.
        let model = api::azure_deployment(&path)
            .or_else(|| parsed.model())
            .unwrap_or("unknown")
            .to_string();
        let counting = self.filter.config.models.resolve(&model);
        if self.filter.tokenizers.counter(counting.encoding).is_none() {
            // Cannot happen with a validated config (its encodings are all built); if it
            // does, the request is not worth failing for it.
            host.log(
                Level::Error,
                &format!(
                    "#{} no tokenizer for {}; passing through",
                    self.id, counting.encoding
                ),
            );
            host.counter_add(Stat::new("passthrough").tag("reason", "internal").name(), 1);
            return Action::Continue;
        }
        let filter = Rc::clone(&self.filter);
        let config = &filter.config;
        let prompt = self.count(&parsed, &model, counting);
        let max_output = parsed.output_reservation(config.default_max_output_tokens);
        let mut call = Call {
            kind,
            path,
            model_tag: filter.model_tag(&model),
            counting,
            prompt,
            response: Response::Pending,
            cluster: None,
            served_model: model.clone(),
            reservations: Vec::new(),
            rate: None,
            warnings: Vec::new(),
            rerouted: false,
            priority: who.priority,
            tenant_tag: who.tenant_tag.clone(),
            holds: Vec::new(),
            decision: None,
        };
        // The body as it will go upstream; rewritten by truncation, rerouting and usage
        // injection, and put back once at the end.
        let mut body: Option<Vec<u8>> = None;
        if config.has_budgets() {
            match self.enforce(host, &original, &parsed, &mut call, &who, max_output) {
                Ok(new_body) => body = new_body,
                Err(reply) => return reply,
            }
        }
        if config.inject_stream_usage {
            // A rewritten body (truncated, rerouted) is the one to inject into; it asks for
            // a stream exactly when the original did.
            let current = body.as_deref().unwrap_or(&original);
            match rewrite::with_stream_usage(current, &parsed) {
                Ok(Some(new_body)) => body = Some(new_body),
                Ok(None) => {}
                Err(_) => {
                    let now_ms = host.now_ms();
                    plan::settle(host, config, &call.reservations, |_, _| 0, now_ms);
                    return self.unrewritable(host, &call);
                }
            }
        }
        if let Some(new_body) = body {
            host.replace_request_body(original.len(), &new_body);
            // Envoy does not fix content-length when a filter replaces the body.
            host.set_request_header("content-length", Some(&new_body.len().to_string()));
        }
        if host.log_enabled(Level::Debug) {
            host.log(
            Level::Debug,
            &format!(
                "#{} {} encoding={} prompt_tokens={} exact={} stream={} max_output={} priority={} reserved_in={} rerouted={}",
                self.id,
                kind.tag(),
                counting.encoding,
                call.prompt.tokens,
                call.prompt.exact,
                parsed.stream(),
                max_output,
                call.priority.tag(),
                call.reservations.len(),
                call.rerouted,
            ),
        );
        }
        if !config.global_budgets.is_empty() {
            return self.check_global(host, Box::new(call), &who.global_ids, max_output);
        }
        self.admitted(host, Box::new(call));
        Action::Continue
    }

    /// The request is admitted: count the decision and read the response as it comes.
    fn admitted(&mut self, host: &mut dyn Host, mut call: Box<Call>) {
        if let Some(decision) = call.decision.take() {
            self.decision(host, &call, decision, None);
        }
        self.phase = Phase::Forwarded(call);
    }

    /// Ask the rate limit service to reserve the request on every global budget, and hold
    /// the request until it answers (or answer now, if no call could be sent).
    fn check_global(
        &mut self,
        host: &mut dyn Host,
        call: Box<Call>,
        ids: &[String],
        max_output: u64,
    ) -> Action {
        let filter = Rc::clone(&self.filter);
        let config = &filter.config;
        let Some(service) = &config.rate_limit_service else {
            self.admitted(host, call);
            return Action::Continue;
        };
        let hits: Vec<u64> = config
            .global_budgets
            .iter()
            .map(|budget| {
                plan::reservation_in(
                    &config.prices,
                    budget.unit,
                    &call.served_model,
                    call.prompt.tokens,
                    max_output,
                )
            })
            .collect();
        if let Some((i, (key, &hits))) = ids
            .iter()
            .zip(&hits)
            .enumerate()
            .find(|(_, (_, &h))| h > u64::from(u32::MAX))
        {
            // More than one call can carry: this request can never pass. Nothing is sent.
            let check = global::Check {
                token: 0,
                budget: i,
                key: key.clone(),
                hits,
                outcome: Some(global::Outcome::OverLimit(None)),
            };
            return self.conclude(host, call, vec![check]);
        }
        let mut checks = Vec::with_capacity(config.global_budgets.len());
        for (i, ((budget, key), &hits)) in
            config.global_budgets.iter().zip(ids).zip(&hits).enumerate()
        {
            let (token, outcome) =
                match global::dispatch_check(host, service, &budget.name, key, hits) {
                    Ok(token) => (token, None),
                    Err(reason) => (0, Some(global::Outcome::Failed(reason))),
                };
            checks.push(global::Check {
                token,
                budget: i,
                key: key.clone(),
                hits,
                outcome,
            });
        }
        if checks.iter().all(|c| c.outcome.is_some()) {
            return self.conclude(host, call, checks);
        }
        self.phase = Phase::Checking { call, checks };
        Action::Pause
    }

    /// The rate limit service answered call `token` (`grpc_status` as Envoy reports it).
    pub fn on_grpc_response(
        &mut self,
        host: &mut dyn Host,
        token: u32,
        grpc_status: u32,
        body_size: usize,
    ) {
        let Phase::Checking { checks, .. } = &mut self.phase else {
            return;
        };
        let Some(check) = checks
            .iter_mut()
            .find(|c| c.token == token && c.outcome.is_none())
        else {
            return;
        };
        let body = if grpc_status == 0 {
            host.grpc_response_body(body_size)
        } else {
            None
        };
        check.outcome = Some(global::outcome(grpc_status, body.as_deref()));
        if checks.iter().any(|c| c.outcome.is_none()) {
            return;
        }
        let Phase::Checking { call, checks } = std::mem::replace(&mut self.phase, Phase::Idle)
        else {
            return;
        };
        if self.conclude(host, call, checks) == Action::Continue {
            host.resume_request();
        }
    }

    /// Every global check has an outcome: admit (Continue) or answer (Pause).
    fn conclude(
        &mut self,
        host: &mut dyn Host,
        mut call: Box<Call>,
        checks: Vec<global::Check>,
    ) -> Action {
        let filter = Rc::clone(&self.filter);
        let config = &filter.config;
        let mode = config
            .rate_limit_service
            .as_ref()
            .map_or(FailureMode::Open, |s| s.on_failure);
        let mut refusal: Option<(&global::Check, Option<rls::DescriptorStatus>)> = None;
        let mut failure: Option<&global::Check> = None;
        for check in &checks {
            let Some(budget) = config.global_budgets.get(check.budget) else {
                continue;
            };
            let name = budget.name.as_str();
            match &check.outcome {
                Some(global::Outcome::Ok(status)) => {
                    call.holds.push(global::Hold {
                        budget: check.budget,
                        key: check.key.clone(),
                        hits: check.hits,
                    });
                    if let (Unit::Tokens, Some(s)) = (budget.unit, status) {
                        if let Some(limit) = s.limit {
                            let h = RateHeaders {
                                limit: u64::from(limit),
                                remaining: u64::from(s.remaining),
                                reset_ms: s.reset_secs.unwrap_or(0).saturating_mul(1000),
                            };
                            if call.rate.is_none_or(|old| h.remaining < old.remaining) {
                                call.rate = Some(h);
                            }
                        }
                    }
                }
                Some(global::Outcome::OverLimit(status)) if refusal.is_none() => {
                    refusal = Some((check, *status));
                }
                Some(global::Outcome::OverLimit(_)) => {}
                Some(global::Outcome::Failed(reason)) => {
                    host.counter_add(
                        Stat::new("global_errors")
                            .tag("budget", name)
                            .tag("reason", reason)
                            .name(),
                        1,
                    );
                    host.log(
                        Level::Warn,
                        &format!(
                            "#{} global budget {name}: no verdict from the rate limit service ({reason}); failing {}",
                            self.id,
                            match mode {
                                FailureMode::Open => "open",
                                FailureMode::Closed => "closed",
                            }
                        ),
                    );
                    match mode {
                        FailureMode::Open => {
                            host.counter_add(Stat::new("fail_open").tag("budget", name).name(), 1);
                        }
                        FailureMode::Closed => {
                            if failure.is_none() {
                                failure = Some(check);
                            }
                        }
                    }
                }
                None => {}
            }
        }
        if refusal.is_none() && failure.is_none() {
            self.admitted(host, call);
            return Action::Continue;
        }
        // Refused: local reservations go back; what the service already took cannot.
        let now_ms = host.now_ms();
        plan::settle(host, config, &call.reservations, |_, _| 0, now_ms);
        for hold in &call.holds {
            if let Some(budget) = config.global_budgets.get(hold.budget) {
                add(
                    host,
                    &Stat::new("global_unreturned").tag("budget", &budget.name),
                    hold.hits,
                );
            }
        }
        let budget_of = |check: &global::Check| config.global_budgets.get(check.budget);
        if let Some((check, status, budget)) =
            refusal.and_then(|(c, st)| Some((c, st, budget_of(c)?)))
        {
            self.decision(host, &call, "rejected", Some(&budget.name));
            reject_global(
                host,
                budget,
                check.hits,
                status,
                config.should_retry_max_secs,
            );
        } else {
            // A failure under `on_failure: closed` (every refusal names a budget).
            let name = failure.and_then(budget_of).map(|b| b.name.as_str());
            self.decision(host, &call, "unavailable", name);
            send_error(
                host,
                503,
                "tokenfuse: the budget service did not answer; retry",
                "server_error",
                "budget_service_unavailable",
                &[("retry-after", "1")],
            );
        }
        Action::Pause
    }

    /// Request trailers arrived: the body is complete (HTTP/2 requests with trailers never
    /// flag the end of their body, and must not slip through uncounted).
    pub fn on_request_trailers(&mut self, host: &mut dyn Host) -> Action {
        match self.phase {
            Phase::AwaitingBody { .. } | Phase::AdminBody => {
                let size = self.buffered;
                self.on_request_body(host, size, true)
            }
            _ => Action::Continue,
        }
    }

    fn count(&self, parsed: &RequestBody, model: &str, counting: ModelCounting) -> PromptCount {
        let config = &self.filter.config;
        let images = ImageCosts {
            low: config.image_tokens_low,
            high: config.image_tokens_high,
        };
        match self.filter.tokenizers.counter(counting.encoding) {
            Some(counter) => count_prompt(parsed, model, counting, counter, images),
            None => PromptCount {
                tokens: 0,
                exact: false,
            },
        }
    }

    /// Apply the budgets: oversize check (or truncation), reservation, reroute. Returns the
    /// rewritten body if any, or the action after a local reply.
    fn enforce(
        &mut self,
        host: &mut dyn Host,
        original: &[u8],
        parsed: &RequestBody,
        call: &mut Call,
        who: &Identity,
        max_output: u64,
    ) -> Result<Option<Vec<u8>>, Action> {
        let filter = Rc::clone(&self.filter);
        let config = &filter.config;
        let now_ms = host.now_ms();
        let now = now_ms.div_euclid(1000);
        let mut body: Option<Vec<u8>> = None;

        // Each budget's key, located in its slots (or the overflow account).
        let mut placed = Vec::with_capacity(config.budgets.len());
        for (i, (budget, id)) in config.budgets.iter().zip(&who.budget_ids).enumerate() {
            let key = filter.budget_key(i, id);
            let hint = key.slot.get();
            if let (Some(slot), false) = (hint, config.may_change_route()) {
                // No read-only pass will look at the account: go straight to the
                // reservation, which checks the owner (and places the key again if the
                // slot was taken over).
                placed.push(plan::Placed {
                    budget: i,
                    key,
                    slot,
                    account: None,
                });
                continue;
            }
            match ledger::locate(host, budget, id, now, hint, config.cas_retries) {
                Ok(found) if found.slot == ledger::Slot::Overflow => {
                    host.counter_add(
                        Stat::new("keys_overflowed")
                            .tag("budget", &budget.name)
                            .name(),
                        1,
                    );
                    placed.push(plan::Placed {
                        budget: i,
                        key: filter.budget_key(i, ledger::OVERFLOW_KEY),
                        slot: found.slot,
                        account: found.account,
                    });
                }
                Ok(found) => {
                    key.slot.set(Some(found.slot));
                    placed.push(plan::Placed {
                        budget: i,
                        key,
                        slot: found.slot,
                        account: found.account,
                    });
                }
                Err(_) => match config.on_store_failure {
                    FailureMode::Open => {
                        host.counter_add(
                            Stat::new("fail_open").tag("budget", &budget.name).name(),
                            1,
                        );
                    }
                    FailureMode::Closed => {
                        self.decision(host, call, "unavailable", Some(budget.name.as_str()));
                        send_error(
                            host,
                            503,
                            "tokenfuse: budget store is busy; retry",
                            "server_error",
                            "budget_store_unavailable",
                            &[],
                        );
                        return Err(Action::Pause);
                    }
                },
            }
        }

        // The per-request cap (circuit breaker).
        let estimate = call.prompt.tokens.saturating_add(max_output);
        let mut trunc_cap: Option<(u64, &str)> = None;
        for (name, cap, oversize) in config.request_caps() {
            if estimate <= cap {
                continue;
            }
            match oversize {
                OversizeAction::Reject => {
                    return Err(self.oversize(host, call, name, cap, estimate))
                }
                OversizeAction::Truncate => {
                    if trunc_cap.is_none_or(|(c, _)| cap < c) {
                        trunc_cap = Some((cap, name));
                    }
                }
            }
        }
        if let Some((cap, cap_budget)) = trunc_cap {
            let fitted = cap.checked_sub(max_output).and_then(|max_prompt| {
                let costs = self.message_costs(parsed, &call.served_model, call.counting)?;
                truncate::truncate(original, parsed, &costs, max_prompt)
            });
            match fitted {
                Some(t) => {
                    host.counter_add(Stat::new("truncated_messages").name(), t.dropped as u64);
                    self.decision(host, call, "truncated", None);
                    call.prompt = PromptCount {
                        tokens: t.prompt,
                        exact: call.prompt.exact,
                    };
                    body = Some(t.body);
                }
                None => return Err(self.oversize(host, call, cap_budget, cap, estimate)),
            }
        }

        let seed = who
            .request_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.id, now_ms));
        let facts = Facts {
            model: &call.served_model,
            prompt: call.prompt.tokens,
            max_output,
            priority: call.priority,
            pick: budget::pick(&seed),
            now_ms,
        };
        match plan::plan(host, config, &placed, &facts) {
            Plan::Reject(r) => {
                self.decision(host, call, "rejected", Some(&r.budget));
                self.reject(host, &r, config.should_retry_max_secs);
                Err(Action::Pause)
            }
            Plan::Unavailable { budget } => {
                self.decision(host, call, "unavailable", Some(&budget));
                send_error(
                    host,
                    503,
                    "tokenfuse: budget store is busy; retry",
                    "server_error",
                    "budget_store_unavailable",
                    &[],
                );
                Err(Action::Pause)
            }
            Plan::Admit {
                reservations,
                reroute_to,
                degraded,
                warnings,
                headers,
                failed_open,
                cas_retries,
                standings,
            } => {
                self.budget_gauges(host, &standings);
                if cas_retries > 0 {
                    host.counter_add(Stat::new("cas_retries").name(), u64::from(cas_retries));
                }
                for name in &failed_open {
                    host.counter_add(Stat::new("fail_open").tag("budget", name).name(), 1);
                }
                for r in &reservations {
                    let Some(b) = config.budgets.get(r.budget) else {
                        continue;
                    };
                    add(
                        host,
                        &Stat::new("reserved")
                            .tag("budget", &b.name)
                            .tag("unit", b.unit.tag()),
                        r.drawn.total(),
                    );
                }
                let decision = match (&reroute_to, degraded, warnings.is_empty()) {
                    (Some(_), true, _) => "degraded",
                    (Some(_), false, _) => "rerouted",
                    (None, _, false) => "warned",
                    (None, _, true) => "allowed",
                };
                // Counted once the global budgets (if any) have admitted it too.
                call.decision = Some(decision);
                if let Some(to) = reroute_to {
                    let current = body.as_deref().unwrap_or(original);
                    // Azure serves the path's deployment: that is what changes (and the
                    // body's model too, when it names one); elsewhere the body's model.
                    let azure_path = api::with_azure_deployment(&call.path, &to);
                    let edited = match (&azure_path, parsed.model()) {
                        (Some(_), None) => Ok(None),
                        _ => rewrite::set_model(current, &to).map(Some),
                    };
                    match edited {
                        Ok(new_body) => {
                            if let Some(new_body) = new_body {
                                body = Some(new_body);
                            }
                            if let Some(path) = &azure_path {
                                host.set_request_header(":path", Some(path));
                            }
                        }
                        Err(_) => {
                            // Never forward the dearer model billed as the cheaper one.
                            plan::settle(host, config, &reservations, |_, _| 0, now_ms);
                            return Err(self.unrewritable(host, call));
                        }
                    }
                    host.set_request_header(&config.reroute.header, Some(&config.reroute.value));
                    host.clear_route_cache();
                    // Stats follow the model that serves (and bills) the request.
                    call.model_tag = filter.model_tag(&to);
                    call.served_model = to;
                    call.rerouted = true;
                }
                call.reservations = reservations;
                call.rate = headers;
                call.warnings = warnings;
                Ok(body)
            }
        }
    }

    /// Count a budget decision: `tokenfuse_decisions.[tenant.]decision.[budget.]priority`.
    fn decision(&self, host: &mut dyn Host, call: &Call, decision: &str, budget: Option<&str>) {
        let mut stat = Stat::new("decisions");
        if let Some(t) = &call.tenant_tag {
            stat = stat.tag("tenant", t);
        }
        stat = stat.tag("decision", decision);
        if let Some(b) = budget {
            stat = stat.tag("budget", b);
        }
        host.counter_add(stat.tag("priority", call.priority.tag()).name(), 1);
    }

    /// A body edit failed on a body the reader admitted (never expected): refuse rather
    /// than forward a body that says something else than what was billed.
    fn unrewritable(&self, host: &mut dyn Host, call: &Call) -> Action {
        self.decision(host, call, "unrewritable", None);
        host.log(
            Level::Error,
            &format!("#{} could not edit the request body; refused", self.id),
        );
        send_error(
            host,
            500,
            "tokenfuse: the request could not be prepared for the upstream; it was not sent",
            "server_error",
            "request_rewrite_failed",
            &[],
        );
        Action::Pause
    }

    /// The per-message costs of `parsed`, counted for `model`.
    fn message_costs(
        &self,
        parsed: &RequestBody,
        model: &str,
        counting: ModelCounting,
    ) -> Option<crate::llm::prompt::MessageCosts> {
        let config = &self.filter.config;
        let images = ImageCosts {
            low: config.image_tokens_low,
            high: config.image_tokens_high,
        };
        let counter = self.filter.tokenizers.counter(counting.encoding)?;
        crate::llm::prompt::message_costs(parsed, model, counting, counter, images)
    }

    fn oversize(
        &self,
        host: &mut dyn Host,
        call: &Call,
        budget: &str,
        cap: u64,
        estimate: u64,
    ) -> Action {
        self.decision(host, call, "oversize", Some(budget));
        send_error(
            host,
            400,
            &format!(
                "tokenfuse: this request needs {estimate} tokens (prompt plus maximum output), over the {cap}-token per-request limit of budget '{budget}'; shorten the conversation or lower max_tokens"
            ),
            "invalid_request_error",
            "request_tokens_exceeded",
            &[],
        );
        Action::Pause
    }

    fn reject(&self, host: &mut dyn Host, r: &Rejection, should_retry_max_secs: u64) {
        let reset = go_duration(r.reset_ms);
        let unit = if r.unit == Unit::Tokens {
            "tokens"
        } else {
            "micro-USD"
        };
        // This window's limit stands in for the next one's (base, burst and elastic as
        // they are now): a request above it cannot pass by waiting.
        let hopeless = r.hopeless(r.limit);
        let message = if r.no_cheaper_model {
            format!("tokenfuse: budget '{}' is spent and this model has no cheaper alternative; it resets in {reset}", r.budget)
        } else if hopeless {
            format!(
                "tokenfuse: this request needs {} {unit}, more than priority {} may use of budget '{}' ({}% of {}); lower max_tokens or shorten the prompt",
                r.needed, r.priority.tag(), r.budget, (r.ceiling * 100.0).round(), r.limit
            )
        } else if r.needed <= r.remaining {
            format!(
                "tokenfuse: budget '{}' keeps its last {}% for higher priorities; this priority-{} request needs {} {unit} and {} of {} are left; it resets in {reset}",
                r.budget, (100.0 - r.ceiling * 100.0).round(), r.priority.tag(), r.needed, r.remaining, r.limit
            )
        } else {
            format!(
                "tokenfuse: budget '{}' is spent for this key: this request needs {} {unit} and {} of {} are left; it resets in {reset}",
                r.budget, r.needed, r.remaining, r.limit
            )
        };
        send_429(
            host,
            &message,
            &r.budget,
            r.unit,
            r.retry_after_secs,
            Some((r.limit, r.remaining, &reset)),
            hopeless || r.retry_after_secs > should_retry_max_secs,
        );
    }

    /// Response headers arrived.
    pub fn on_response_headers(&mut self, host: &mut dyn Host, end_of_stream: bool) -> Action {
        let Phase::Forwarded(call) = &mut self.phase else {
            return Action::Continue;
        };
        host.set_response_header(PROMPT_TOKENS_HEADER, Some(&call.prompt.tokens.to_string()));
        if let Some(rate) = call.rate {
            host.set_response_header("x-ratelimit-limit-tokens", Some(&rate.limit.to_string()));
            host.set_response_header(
                "x-ratelimit-remaining-tokens",
                Some(&rate.remaining.to_string()),
            );
            host.set_response_header(
                "x-ratelimit-reset-tokens",
                Some(&go_duration(rate.reset_ms)),
            );
        }
        if !call.warnings.is_empty() {
            host.set_response_header(WARNING_HEADER, Some(&call.warnings.join(",")));
        }
        if call.rerouted {
            host.set_response_header(REROUTED_HEADER, Some(&call.served_model));
        }
        call.cluster = host.upstream_cluster();
        let status = host
            .response_header(":status")
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        let content_type = host.response_header("content-type").unwrap_or_default();
        let encoded = host
            .response_header("content-encoding")
            .is_some_and(|e| !e.eq_ignore_ascii_case("identity"));
        let config = &self.filter.config;
        call.response = if !(200..300).contains(&status) {
            Response::UpstreamError { status }
        } else if encoded {
            Response::Unreadable
        } else if content_type
            .to_ascii_lowercase()
            .starts_with("text/event-stream")
        {
            Response::Stream {
                decoder: SseDecoder::new(config.max_stream_text_bytes),
                meter: StreamMeter::new(call.kind, config.max_stream_text_bytes),
            }
        } else {
            Response::Json {
                body: Vec::new(),
                overflowed: false,
            }
        };
        if end_of_stream {
            self.settle(host, true);
        }
        Action::Continue
    }

    /// A response body chunk of `body_size` bytes arrived. Never delays it.
    pub fn on_response_body(
        &mut self,
        host: &mut dyn Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        let Phase::Forwarded(call) = &mut self.phase else {
            return Action::Continue;
        };
        let max_json = self.filter.config.max_response_body_bytes;
        match &mut call.response {
            Response::Json { body, overflowed } if !*overflowed && body_size > 0 => {
                if body.len().saturating_add(body_size) > max_json {
                    *overflowed = true;
                    *body = Vec::new();
                } else if let Some(chunk) = host.response_body(body_size) {
                    body.extend_from_slice(&chunk);
                }
            }
            Response::Stream { decoder, meter } if body_size > 0 => {
                if let Some(chunk) = host.response_body(body_size) {
                    if let Some(counter) = self.filter.tokenizers.counter(call.counting.encoding) {
                        decoder.feed(&chunk, |event, data| meter.on_event(event, data, counter));
                    }
                }
            }
            _ => {}
        }
        if end_of_stream {
            self.settle(host, true);
        }
        Action::Continue
    }

    /// The stream is over (completed, reset or abandoned). Settles anything not yet settled.
    pub fn on_done(&mut self, host: &mut dyn Host) {
        self.settle(host, false);
    }

    /// Settle the exchange into stats and budgets, exactly once.
    fn settle(&mut self, host: &mut dyn Host, ended: bool) {
        let (mut call, forwarded) = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Forwarded(call) => (call, true),
            // The client left while the rate limit service was asked: Envoy cancels the
            // calls, nothing went upstream, local reservations go back.
            Phase::Checking { mut call, .. } => {
                call.decision = None;
                (call, false)
            }
            _ => return,
        };
        let cluster = call
            .cluster
            .clone()
            .or_else(|| host.upstream_cluster())
            .unwrap_or_else(|| "none".to_string());
        let model = call.model_tag.clone();
        let tenant = call.tenant_tag.clone();
        // `name.tenant.…`: the tenant tag only when tenant tagging is on.
        let with_tenant = |name: &str| match &tenant {
            Some(t) => Stat::new(name).tag("tenant", t),
            None => Stat::new(name),
        };
        let tagged = |name: &str| {
            Stat::new(name)
                .tag("model", &model)
                .tag("cluster", &cluster)
        };
        host.counter_add(
            with_tenant("requests")
                .tag("api", call.kind.tag())
                .tag("model", &model)
                .tag("cluster", &cluster)
                .name(),
            1,
        );
        add(host, &tagged("request_prompt_tokens"), call.prompt.tokens);
        if !call.prompt.exact {
            host.counter_add(tagged("prompt_estimates").name(), 1);
        }
        let counted = |output: u64| Billed::Usage {
            source: Source::Counted,
            usage: UsageReport {
                input: call.prompt.tokens,
                output,
                ..UsageReport::default()
            },
        };
        let counter = self.filter.tokenizers.counter(call.counting.encoding);
        let billed = match std::mem::replace(&mut call.response, Response::Pending) {
            Response::Pending => {
                host.counter_add(tagged("no_response").name(), 1);
                // The client left before the response headers. The provider usually went
                // on generating, and bills it: keep the reservation unless told otherwise.
                match self.filter.config.abandoned {
                    AbandonedPolicy::Charge if forwarded => Billed::Unknown,
                    _ => Billed::Nothing,
                }
            }
            Response::UpstreamError { status } => {
                let class = format!("{}xx", status / 100);
                host.counter_add(tagged("upstream_errors").tag("status", &class).name(), 1);
                Billed::Nothing
            }
            Response::Unreadable => {
                self.parse_failure(host, call.kind, "encoded");
                Billed::Unknown
            }
            Response::Json {
                overflowed: true, ..
            } => {
                self.parse_failure(host, call.kind, "too_large");
                Billed::Unknown
            }
            Response::Json { .. } if !ended => {
                // The client or upstream went away mid-body: what arrived may not parse,
                // and the provider has produced (and bills) the whole answer.
                host.counter_add(tagged("responses_incomplete").name(), 1);
                Billed::Unknown
            }
            Response::Json { body, .. } => {
                let anthropic = call.kind == ApiKind::AnthropicMessages;
                match usage_from_json(&body, anthropic) {
                    Ok(usage) => Billed::Usage {
                        source: Source::Provider,
                        usage,
                    },
                    Err(UsageError::Missing) => counted(
                        counter
                            .map(|c| {
                                scale(json_output_tokens(&body, c), call.counting.safety_factor)
                            })
                            .unwrap_or(0),
                    ),
                    Err(UsageError::NotJson) => {
                        self.parse_failure(host, call.kind, "json");
                        Billed::Unknown
                    }
                }
            }
            Response::Stream { mut meter, .. } => match counter {
                Some(c) => {
                    let outcome = meter.finish(c);
                    if outcome.bad_events > 0 {
                        self.parse_failure(host, call.kind, "sse_event");
                    }
                    if !outcome.complete {
                        host.counter_add(tagged("responses_incomplete").name(), 1);
                    }
                    let streamed = scale(outcome.counted_output, call.counting.safety_factor);
                    match outcome.reported {
                        Some(usage) if outcome.complete => Billed::Usage {
                            source: Source::Provider,
                            usage,
                        },
                        // Cut after some usage arrived: the provider's figures, but at least
                        // the output that was streamed (Anthropic's message_start says 1
                        // output token; the final count comes only at the end).
                        Some(usage) => Billed::Usage {
                            source: Source::Provider,
                            usage: UsageReport {
                                output: usage.output.max(streamed),
                                ..usage
                            },
                        },
                        None => counted(streamed),
                    }
                }
                None => Billed::Unknown,
            },
        };
        let (prompt, completion, source) = match &billed {
            Billed::Usage { source, usage } => (usage.input, usage.output, Some(*source)),
            Billed::Unknown => (call.prompt.tokens, 0, Some(Source::Counted)),
            Billed::Nothing => (0, 0, None),
        };
        if let Some(source) = source {
            if source == Source::Counted {
                host.counter_add(tagged("usage_counted").name(), 1);
            }
            for (kind, n) in [("prompt", prompt), ("completion", completion)] {
                let stat = with_tenant("tokens")
                    .tag("kind", kind)
                    .tag("source", source.tag())
                    .tag("model", &model)
                    .tag("cluster", &cluster);
                add(host, &stat, n);
            }
        }
        // Spend, when the operator priced the serving model.
        if let Billed::Usage { usage, .. } = &billed {
            if let Some(price) = self.filter.config.prices.get(&call.served_model) {
                let stat = with_tenant("cost_micro_usd")
                    .tag("model", &model)
                    .tag("cluster", &cluster);
                add(host, &stat, price.actual(usage));
            }
        }
        self.settle_budgets(host, &call, &billed);
        self.settle_global(host, &call, &billed);
        if host.log_enabled(Level::Debug) {
            host.log(
                Level::Debug,
                &format!(
                    "#{} settled {} prompt={} completion={} source={}",
                    self.id,
                    call.kind.tag(),
                    prompt,
                    completion,
                    source.map_or("none", Source::tag)
                ),
            );
        }
    }

    /// Replace the budgets' reservations by what the exchange cost.
    fn settle_budgets(&self, host: &mut dyn Host, call: &Call, billed: &Billed) {
        if call.reservations.is_empty() {
            return;
        }
        let config = &self.filter.config;
        let now_ms = host.now_ms();
        let report = plan::settle(
            host,
            config,
            &call.reservations,
            |budget, reservation| match billed {
                Billed::Nothing => 0,
                Billed::Usage { usage, .. } => {
                    plan::actual_amount(config, budget, &call.served_model, usage)
                }
                // Keep what was reserved: the output is unknown, the provider billed it.
                Billed::Unknown => reservation.drawn.total(),
            },
            now_ms,
        );
        if report.cas_retries > 0 {
            host.counter_add(
                Stat::new("cas_retries").name(),
                u64::from(report.cas_retries),
            );
        }
        self.budget_gauges(host, &report.standings);
        if report.refunded > 0 {
            host.counter_add(Stat::new("refunded").name(), report.refunded);
        }
        if report.charged_extra > 0 {
            host.counter_add(Stat::new("charged_extra").name(), report.charged_extra);
        }
        for name in &report.failed {
            host.counter_add(Stat::new("settle_failures").tag("budget", name).name(), 1);
            host.log(
                Level::Error,
                &format!(
                    "#{} could not settle budget {name}: shared data contended or unavailable",
                    self.id
                ),
            );
        }
    }

    /// Queue what the global budgets are owed beyond their holds; count what they keep
    /// beyond the cost (the protocol cannot give hits back).
    fn settle_global(&self, host: &mut dyn Host, call: &Call, billed: &Billed) {
        let config = &self.filter.config;
        for hold in &call.holds {
            let Some(budget) = config.global_budgets.get(hold.budget) else {
                continue;
            };
            let cost = match billed {
                Billed::Nothing => 0,
                Billed::Usage { usage, .. } => {
                    plan::cost_in(&config.prices, budget.unit, &call.served_model, usage)
                }
                Billed::Unknown => hold.hits,
            };
            if cost > hold.hits {
                self.filter.settlements.borrow_mut().add(
                    host,
                    config,
                    hold.budget,
                    &hold.key,
                    cost.saturating_sub(hold.hits),
                );
            } else {
                add(
                    host,
                    &Stat::new("global_unreturned").tag("budget", &budget.name),
                    hold.hits.saturating_sub(cost),
                );
            }
        }
    }

    /// Gauges of each touched budget key: used, limit and remaining, in the budget's unit.
    /// Keys beyond the tenant tag cap get no gauges (an `other` gauge would be meaningless).
    fn budget_gauges(&self, host: &mut dyn Host, standings: &[(usize, Rc<BudgetKey>, Standing)]) {
        for (_, key, standing) in standings {
            if let Some([used, limit, remaining]) = &key.gauges {
                host.gauge_set(used, standing.used);
                host.gauge_set(limit, standing.limit);
                host.gauge_set(remaining, standing.remaining);
            }
        }
    }

    fn parse_failure(&self, host: &mut dyn Host, kind: ApiKind, reason: &str) {
        host.counter_add(
            Stat::new("parse_failures")
                .tag("stage", "response")
                .tag("api", kind.tag())
                .tag("reason", reason)
                .name(),
            1,
        );
    }

    /// An LLM request whose body cannot be read.
    fn malformed(&mut self, host: &mut dyn Host, kind: ApiKind, error: &RequestError) -> Action {
        self.phase = Phase::Idle;
        let policy = self.filter.config.malformed_request;
        host.counter_add(
            Stat::new("parse_failures")
                .tag("stage", "request")
                .tag("api", kind.tag())
                .tag("reason", error_reason(error))
                .name(),
            1,
        );
        host.log(
            Level::Info,
            &format!(
                "#{} unreadable {} request ({}): {}",
                self.id,
                kind.tag(),
                match policy {
                    MalformedPolicy::Reject => "rejected",
                    MalformedPolicy::Pass => "passed",
                },
                error
            ),
        );
        match policy {
            MalformedPolicy::Pass => {
                host.counter_add(
                    Stat::new("passthrough").tag("reason", "malformed").name(),
                    1,
                );
                Action::Continue
            }
            MalformedPolicy::Reject => {
                // A compressed body is well-formed but unreadable here: 415, not 400.
                let status = if *error == RequestError::Encoded {
                    415
                } else {
                    400
                };
                send_error(
                    host,
                    status,
                    &format!("tokenfuse: {error}"),
                    "invalid_request_error",
                    error_code(error),
                    &[],
                );
                Action::Pause
            }
        }
    }
}

/// 429 for a global budget the rate limit service says is spent.
fn reject_global(
    host: &mut dyn Host,
    budget: &crate::config::GlobalBudget,
    needed: u64,
    status: Option<rls::DescriptorStatus>,
    should_retry_max_secs: u64,
) {
    let hopeless = needed > u64::from(u32::MAX);
    // Without a reset from the service, a minute is a polite guess.
    let retry_after_secs = status.and_then(|s| s.reset_secs).unwrap_or(60).max(1);
    let unit = if budget.unit == Unit::Tokens {
        "tokens"
    } else {
        "micro-USD"
    };
    let message = if hopeless {
        format!(
            "tokenfuse: this request needs {needed} {unit}, more than global budget '{}' can ever grant; lower max_tokens or shorten the prompt",
            budget.name
        )
    } else {
        format!(
            "tokenfuse: global budget '{}' is spent for this key: this request needs {needed} {unit}; retry in {retry_after_secs}s",
            budget.name
        )
    };
    let reset = go_duration(retry_after_secs.saturating_mul(1000));
    let rate =
        status.and_then(|s| Some((u64::from(s.limit?), u64::from(s.remaining), reset.as_str())));
    send_429(
        host,
        &message,
        &budget.name,
        budget.unit,
        retry_after_secs,
        rate,
        hopeless || retry_after_secs > should_retry_max_secs,
    );
}

/// The 429 every budget refusal answers: `retry-after`, the `x-ratelimit-*-tokens` trio
/// for token budgets whose position is known (`rate`: limit, remaining, reset),
/// `x-should-retry: false` when waiting will not help, and the budget's name.
fn send_429(
    host: &mut dyn Host,
    message: &str,
    budget: &str,
    unit: Unit,
    retry_after_secs: u64,
    rate: Option<(u64, u64, &str)>,
    no_retry: bool,
) {
    let retry_after = retry_after_secs.to_string();
    let rate = rate
        .filter(|_| unit == Unit::Tokens)
        .map(|(limit, remaining, reset)| (limit.to_string(), remaining.to_string(), reset));
    let mut headers: Vec<(&str, &str)> = vec![("retry-after", &retry_after)];
    if let Some((limit, remaining, reset)) = &rate {
        headers.push(("x-ratelimit-limit-tokens", limit));
        headers.push(("x-ratelimit-remaining-tokens", remaining));
        headers.push(("x-ratelimit-reset-tokens", reset));
    }
    if no_retry {
        headers.push(("x-should-retry", "false"));
    }
    headers.push(("x-tokenfuse-budget", budget));
    let kind = match unit {
        Unit::Tokens => "tokens",
        Unit::Usd => "usd",
    };
    send_error(host, 429, message, kind, "rate_limit_exceeded", &headers);
}

fn add(host: &mut dyn Host, stat: &Stat, n: u64) {
    // Envoy rejects counter increments of zero.
    if n > 0 {
        host.counter_add(stat.name(), n);
    }
}

/// Tokens of the generated text in a JSON response that carries no usage.
fn json_output_tokens(body: &[u8], counter: TextCounter<'_>) -> u64 {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return 0;
    };
    let mut total = 0u64;
    let mut count = |t: Option<&str>| {
        if let Some(t) = t {
            total = total.saturating_add(counter.count(t));
        }
    };
    use serde_json::Value;
    fn list<'v>(v: &'v Value, at: &str) -> &'v [Value] {
        v.pointer(at)
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }
    fn text<'v>(v: &'v Value, at: &str) -> Option<&'v str> {
        v.pointer(at).and_then(Value::as_str)
    }
    // Chat / completions.
    for choice in list(&v, "/choices") {
        count(text(choice, "/message/content"));
        count(text(choice, "/text"));
        for call in list(choice, "/message/tool_calls") {
            count(text(call, "/function/name"));
            count(text(call, "/function/arguments"));
        }
    }
    // Responses API.
    for item in list(&v, "/output") {
        for part in list(item, "/content") {
            count(text(part, "/text"));
        }
        count(text(item, "/arguments"));
    }
    // Anthropic.
    for block in list(&v, "/content") {
        count(text(block, "/text"));
        if let Some(input) = block.get("input") {
            count(Some(&input.to_string()));
        }
    }
    total
}

fn error_reason(e: &RequestError) -> &'static str {
    match e {
        RequestError::Empty => "empty",
        RequestError::Syntax { .. } => "json",
        RequestError::Shape { .. } => "shape",
        RequestError::Invalid { .. } => "invalid",
        RequestError::Encoded => "encoded",
    }
}

fn error_code(e: &RequestError) -> &'static str {
    match e {
        RequestError::Empty => "empty_body",
        RequestError::Syntax { .. } => "invalid_json",
        RequestError::Shape { .. } => "invalid_request_shape",
        RequestError::Invalid { .. } => "invalid_value",
        RequestError::Encoded => "unsupported_content_encoding",
    }
}

/// An OpenAI-style error reply: `{"error":{"message","type","param","code"}}`.
fn send_error(
    host: &mut dyn Host,
    status: u32,
    message: &str,
    kind: &str,
    code: &str,
    extra: &[(&str, &str)],
) {
    // Written by hand to keep OpenAI's field order (serde_json's map would sort the keys).
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let body = format!(
        r#"{{"error":{{"message":{},"type":{},"param":null,"code":{}}}}}"#,
        quote(message),
        quote(kind),
        quote(code)
    );
    let mut headers = vec![
        ("content-type", "application/json"),
        ("x-tokenfuse-error", code),
    ];
    headers.extend_from_slice(extra);
    host.send_reply(status, &headers, body.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::host::fake::FakeHost;

    fn filter(config: &str) -> Rc<Filter> {
        Rc::new(Filter::new(Config::parse(config.as_bytes()).unwrap()).unwrap())
    }

    fn default_filter() -> Rc<Filter> {
        filter(r#"{"api":"v1"}"#)
    }

    const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#;

    /// Drive a request through headers and a body delivered in `split`-byte chunks.
    fn send_request(ex: &mut Exchange, host: &mut FakeHost, split: usize) -> Action {
        let body = host.request_body.clone();
        let a = ex.on_request_headers(host, body.is_empty());
        if a == Action::Continue || host.reply.is_some() {
            return a;
        }
        let mut buffered = 0;
        let chunks: Vec<&[u8]> = body.chunks(split.max(1)).collect();
        for (i, c) in chunks.iter().enumerate() {
            buffered += c.len();
            let last = i + 1 == chunks.len();
            let a = ex.on_request_body(host, buffered, last);
            if last || host.reply.is_some() {
                return a;
            }
            assert_eq!(a, Action::Pause, "partial bodies must be buffered");
        }
        Action::Continue
    }

    fn respond(
        ex: &mut Exchange,
        host: &mut FakeHost,
        status: &str,
        content_type: &str,
        body: &[u8],
        split: usize,
    ) {
        host.response_headers = vec![
            (":status".into(), status.into()),
            ("content-type".into(), content_type.into()),
        ];
        assert_eq!(
            ex.on_response_headers(host, body.is_empty()),
            Action::Continue
        );
        let chunks: Vec<&[u8]> = body.chunks(split.max(1)).collect();
        for (i, c) in chunks.iter().enumerate() {
            host.response_chunk = c.to_vec();
            assert_eq!(
                ex.on_response_body(host, c.len(), i + 1 == chunks.len()),
                Action::Continue
            );
        }
        ex.on_done(host);
    }

    /// A 200 event stream of which `chunk` arrives, then the stream ends without its end of
    /// stream (cut upstream or abandoned by the client).
    fn respond_cut(ex: &mut Exchange, host: &mut FakeHost, chunk: &[u8]) {
        host.response_headers = vec![
            (":status".into(), "200".into()),
            ("content-type".into(), "text/event-stream".into()),
        ];
        ex.on_response_headers(host, false);
        host.response_chunk = chunk.to_vec();
        ex.on_response_body(host, chunk.len(), false);
        ex.on_done(host);
    }

    fn tokens(host: &FakeHost, kind: &str, source: &str) -> u64 {
        host.counter_sum(
            "tokenfuse_tokens",
            &[&format!("kind=.={kind};"), &format!("source=.={source};")],
        )
    }

    #[test]
    fn non_llm_requests_pass_untouched_and_are_counted() {
        let f = default_filter();
        for (method, path) in [
            ("GET", "/v1/models"),
            ("GET", "/v1/chat/completions"),
            ("POST", "/upload"),
        ] {
            let mut host = FakeHost::post(path, b"{}");
            host.request_headers[0].1 = method.into();
            let before = host.request_headers.clone();
            let mut ex = Exchange::new(f.clone(), 1);
            assert_eq!(ex.on_request_headers(&mut host, false), Action::Continue);
            assert_eq!(ex.on_request_body(&mut host, 2, true), Action::Continue);
            host.response_headers = vec![(":status".into(), "200".into())];
            ex.on_response_headers(&mut host, true);
            assert_eq!(host.request_headers, before);
            assert!(host.resp_header(PROMPT_TOKENS_HEADER).is_none());
        }
        let mut host = FakeHost::post("/x", b"");
        host.request_headers[0].1 = "GET".into();
        Exchange::new(f, 2).on_request_headers(&mut host, true);
        assert_eq!(host.counter("tokenfuse_passthrough.reason=.=not_llm;.;"), 1);
    }

    #[test]
    fn chat_request_is_held_until_its_body_is_complete_then_counted() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
        host.request_headers
            .push(("accept-encoding".into(), "gzip".into()));
        let mut ex = Exchange::new(f, 1);
        assert_eq!(ex.on_request_headers(&mut host, false), Action::Pause);
        assert!(host.req_header("accept-encoding").is_none());
        assert_eq!(ex.on_request_body(&mut host, 10, false), Action::Pause);
        assert_eq!(
            ex.on_request_body(&mut host, CHAT.len(), true),
            Action::Continue
        );
        respond(
            &mut ex,
            &mut host,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":3}}"#,
            7,
        );
        assert_eq!(host.resp_header(PROMPT_TOKENS_HEADER).as_deref(), Some("8"));
        assert_eq!(tokens(&host, "prompt", "provider"), 8);
        assert_eq!(tokens(&host, "completion", "provider"), 3);
        assert_eq!(
            host.counter_sum(
                "tokenfuse_requests",
                &["api=.=chat;", "model=.=gpt-4o;", "cluster=.=primary;"]
            ),
            1
        );
        assert_eq!(host.counter_sum("tokenfuse_request_prompt_tokens", &[]), 8);
        assert_eq!(host.counter_sum("tokenfuse_usage_counted", &[]), 0);
    }

    #[test]
    fn json_response_without_usage_counts_the_generated_text() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 5);
        respond(
            &mut ex,
            &mut host,
            "200",
            "application/json",
            br#"{"choices":[{"message":{"role":"assistant","content":"tiktoken is great!"}}]}"#,
            3,
        );
        assert_eq!(tokens(&host, "prompt", "counted"), 8);
        assert_eq!(tokens(&host, "completion", "counted"), 6);
        assert_eq!(host.counter_sum("tokenfuse_usage_counted", &[]), 1);
    }

    #[test]
    fn sse_usage_is_read_at_every_chunk_size() {
        let f = default_filter();
        let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"日本語\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
            let mut ex = Exchange::new(f.clone(), 1);
            send_request(&mut ex, &mut host, 64);
            respond(
                &mut ex,
                &mut host,
                "200",
                "text/event-stream; charset=utf-8",
                stream.as_bytes(),
                split,
            );
            assert_eq!(tokens(&host, "completion", "provider"), 4, "split {split}");
            assert_eq!(
                host.counter_sum("tokenfuse_parse_failures", &[]),
                0,
                "split {split}"
            );
        }
    }

    #[test]
    fn stream_usage_is_injected_with_a_fixed_content_length() {
        let f = filter(r#"{"api":"v1","inject_stream_usage":true}"#);
        let body =
            r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hello"}]}"#;
        let mut host = FakeHost::post("/v1/chat/completions", body.as_bytes());
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 1000);
        let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(
            host.req_header("content-length"),
            Some(host.request_body.len().to_string())
        );
    }

    #[test]
    fn malformed_body_is_rejected_with_an_openai_error_by_default() {
        let f = default_filter();
        for (body, code) in [
            ("{\"model\":", "invalid_json"),
            ("{\"model\":\"gpt-4o\"}", "invalid_request_shape"),
            ("{\"messages\":[],\"max_tokens\":-1}", "invalid_value"),
        ] {
            let mut host = FakeHost::post("/v1/chat/completions", body.as_bytes());
            let mut ex = Exchange::new(f.clone(), 1);
            send_request(&mut ex, &mut host, 4);
            let reply = host.reply.clone().expect("a local reply");
            assert_eq!(reply.status, 400);
            assert_eq!(reply.header("content-type"), Some("application/json"));
            let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert_eq!(v["error"]["code"], code);
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("tokenfuse: "));
        }
    }

    #[test]
    fn empty_body_on_an_llm_path_is_rejected() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", b"");
        let mut ex = Exchange::new(f, 1);
        ex.on_request_headers(&mut host, true);
        assert_eq!(host.reply.as_ref().map(|r| r.status), Some(400));
        assert_eq!(
            host.counter(
                "tokenfuse_parse_failures.stage=.=request;.;api=.=chat;.;reason=.=empty;.;"
            ),
            1
        );
    }

    #[test]
    fn malformed_body_passes_when_configured_to() {
        let f = filter(r#"{"api":"v1","malformed_request":"pass"}"#);
        let mut host = FakeHost::post("/v1/chat/completions", b"not json");
        let mut ex = Exchange::new(f, 1);
        assert_eq!(send_request(&mut ex, &mut host, 3), Action::Continue);
        assert!(host.reply.is_none());
        assert_eq!(host.request_body, b"not json");
        respond(&mut ex, &mut host, "400", "application/json", b"{}", 10);
        assert!(host.resp_header(PROMPT_TOKENS_HEADER).is_none());
        assert_eq!(
            host.counter("tokenfuse_passthrough.reason=.=malformed;.;"),
            1
        );
    }

    #[test]
    fn compressed_request_body_is_refused_with_415() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", b"\x1f\x8b...");
        host.request_headers
            .push(("content-encoding".into(), "gzip".into()));
        let mut ex = Exchange::new(f, 1);
        ex.on_request_headers(&mut host, false);
        assert_eq!(host.reply.as_ref().map(|r| r.status), Some(415));
    }

    #[test]
    fn upstream_errors_bill_nothing() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 100);
        respond(
            &mut ex,
            &mut host,
            "503",
            "application/json",
            br#"{"error":{"message":"overloaded"}}"#,
            100,
        );
        assert_eq!(host.counter_sum("tokenfuse_tokens", &[]), 0);
        assert_eq!(
            host.counter_sum("tokenfuse_upstream_errors", &["status=.=5xx;"]),
            1
        );
        assert_eq!(host.resp_header(PROMPT_TOKENS_HEADER).as_deref(), Some("8"));
    }

    #[test]
    fn cut_stream_is_settled_once_with_what_was_streamed() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 100);
        respond_cut(
            &mut ex,
            &mut host,
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tiktoken is great!\"}}]}\n\ndata: {\"cho",
        );
        ex.on_done(&mut host);
        assert_eq!(tokens(&host, "completion", "counted"), 6);
        assert_eq!(host.counter_sum("tokenfuse_requests", &[]), 1);
        assert_eq!(host.counter_sum("tokenfuse_responses_incomplete", &[]), 1);
    }

    #[test]
    fn a_stream_cut_after_its_first_usage_is_charged_at_least_what_it_streamed() {
        let f = default_filter();
        let body = r#"{"model":"claude-sonnet-4","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
        let mut host = FakeHost::post("/v1/messages", body.as_bytes());
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 100);
        // message_start says 1 output token (its placeholder); the text that follows is more;
        // the stream is cut before message_delta brings the final count.
        respond_cut(
            &mut ex,
            &mut host,
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"tiktoken is great!\"}}\n\n",
        );
        assert_eq!(tokens(&host, "prompt", "provider"), 12);
        assert_eq!(tokens(&host, "completion", "provider"), 6);
        assert_eq!(host.counter_sum("tokenfuse_responses_incomplete", &[]), 1);
    }

    #[test]
    fn oversized_json_response_is_a_parse_failure_not_a_buffer() {
        let f = filter(r#"{"api":"v1","max_response_body_bytes":1024}"#);
        let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 100);
        let big = format!(
            "{{\"x\":\"{}\",\"usage\":{{\"prompt_tokens\":1}}}}",
            "a".repeat(4000)
        );
        respond(
            &mut ex,
            &mut host,
            "200",
            "application/json",
            big.as_bytes(),
            500,
        );
        assert_eq!(
            host.counter_sum("tokenfuse_parse_failures", &["reason=.=too_large;"]),
            1
        );
        assert_eq!(tokens(&host, "prompt", "counted"), 8);
    }

    #[test]
    fn model_from_azure_deployment_when_body_has_none() {
        let f = default_filter();
        let body = r#"{"messages":[{"role":"user","content":"hello"}]}"#;
        let mut host = FakeHost::post(
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            body.as_bytes(),
        );
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut host, 100);
        respond(
            &mut ex,
            &mut host,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":1}}"#,
            100,
        );
        assert_eq!(
            host.counter_sum("tokenfuse_requests", &["model=.=gpt-4o;"]),
            1
        );
    }

    #[test]
    fn logs_never_contain_prompt_or_completion_text() {
        let f = default_filter();
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"SECRET-PROMPT sk-live-123"}]}"#;
        let mut host = FakeHost::post("/v1/chat/completions", body.as_bytes());
        let mut ex = Exchange::new(f.clone(), 1);
        send_request(&mut ex, &mut host, 100);
        respond(&mut ex, &mut host, "200", "text/event-stream", b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"SECRET-COMPLETION\"}}]}\n\n", 9);
        let mut bad = FakeHost::post(
            "/v1/chat/completions",
            br#"{"model":"gpt-4o","messages":"SECRET-PROMPT"}"#,
        );
        send_request(&mut Exchange::new(f, 2), &mut bad, 100);
        for log in [host.log_text(), bad.log_text()] {
            assert!(!log.contains("SECRET") && !log.contains("sk-live"), "{log}");
        }
    }

    #[test]
    fn client_model_names_are_capped_in_stat_tags() {
        let f = filter(r#"{"api":"v1","stats":{"model_tag_limit":2}}"#);
        let mut host = FakeHost::default();
        for m in ["a", "b", "c", "d"] {
            let body = format!(r#"{{"model":"{m}","messages":[]}}"#);
            let mut h = FakeHost::post("/v1/chat/completions", body.as_bytes());
            let mut ex = Exchange::new(f.clone(), 1);
            send_request(&mut ex, &mut h, 100);
            respond(&mut ex, &mut h, "200", "application/json", b"{}", 100);
            for (k, v) in h.counters {
                *host.counters.entry(k).or_default() += v;
            }
        }
        assert_eq!(
            host.counter_sum("tokenfuse_requests", &["model=.=other;"]),
            2
        );
    }

    const BUDGETS: &str = r#"{"api":"v1",
        "budgets":[{"name":"minute","key":"header:x-tenant","window":"minute","base":1000,"max_request_tokens":5000,"oversize":"truncate","base_overrides":{"bigco":100000}},
                   {"name":"usd","key":"header:x-tenant","window":"day","unit":"usd","base":1.0,"action":"reroute","base_overrides":{"thrifty":0.0001}}],
        "prices":{"*":{"input":1,"output":1},"gpt-4o*":{"input":2.5,"output":10}},
        "reroute":{"models":{"gpt-4o":"gpt-4o-mini"}},
        "admin":{"path":"/admin","token":"0123456789abcdef"}}"#;

    fn budget_host(tenant: &str, body: &str, shared: &FakeHost) -> FakeHost {
        let mut h = FakeHost::post("/v1/chat/completions", body.as_bytes());
        h.request_headers.push(("x-tenant".into(), tenant.into()));
        h.request_headers
            .push(("x-request-id".into(), "req-1".into()));
        h.shared = shared.shared.clone();
        h.now_ms.set(1_800_000_030_000);
        h
    }

    fn chat_with(max_tokens: u64) -> String {
        format!(
            r#"{{"model":"gpt-4o","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hello"}}]}}"#
        )
    }

    fn minute_used(shared: &FakeHost, f: &Filter, key: &str) -> u64 {
        let b = &f.config.budgets[0];
        let a = crate::budget::ledger::find(shared, b, key, 1_800_000_030)
            .unwrap()
            .1;
        b.standing(&a, 1_800_000_030).used
    }

    #[test]
    fn an_admitted_request_carries_rate_headers_and_settles_to_actual_usage() {
        let f = filter(BUDGETS);
        let shared = FakeHost::default();
        let mut h = budget_host("acme", &chat_with(100), &shared);
        let mut ex = Exchange::new(f.clone(), 1);
        assert_eq!(send_request(&mut ex, &mut h, 64), Action::Continue);
        assert_eq!(
            minute_used(&shared, &f, "acme"),
            108,
            "8 prompt + 100 reserved"
        );
        respond(
            &mut ex,
            &mut h,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
            10,
        );
        assert_eq!(
            h.resp_header("x-ratelimit-limit-tokens").as_deref(),
            Some("1000")
        );
        assert_eq!(
            h.resp_header("x-ratelimit-remaining-tokens").as_deref(),
            Some("892")
        );
        assert_eq!(
            h.resp_header("x-ratelimit-reset-tokens").as_deref(),
            Some("30s")
        );
        assert_eq!(minute_used(&shared, &f, "acme"), 13, "settled to 8 + 5");
        assert_eq!(
            h.counter_sum("tokenfuse_decisions", &["decision=.=allowed;"]),
            1
        );
    }

    /// An agent loop: step `n` resends the conversation so far plus one new turn.
    fn agent_step(n: usize) -> String {
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": "You are a careful agent. ".repeat(20)}),
        ];
        for i in 0..n {
            messages.push(serde_json::json!({"role": "user", "content": format!("Step {i}: observe the tool output and decide what to do next. ").repeat(8)}));
            messages.push(serde_json::json!({"role": "assistant", "content": format!("Thought {i}: 東京の天気 and fn step_{i}() {{ retry(); }} ").repeat(6)}));
        }
        serde_json::json!({"model": "gpt-4o", "messages": messages}).to_string()
    }

    fn prompt_tokens_of(f: &Rc<Filter>, body: &str) -> String {
        let mut h = FakeHost::post("/v1/chat/completions", body.as_bytes());
        let mut ex = Exchange::new(f.clone(), 1);
        assert_eq!(send_request(&mut ex, &mut h, 4096), Action::Continue);
        respond(&mut ex, &mut h, "200", "application/json", b"{}", 64);
        h.resp_header(PROMPT_TOKENS_HEADER).unwrap()
    }

    #[test]
    fn an_agent_loop_counts_the_same_with_the_count_cache_and_mostly_from_it() {
        let cached = default_filter();
        let uncached = filter(r#"{"api":"v1","tokenizer":{"cache_bytes":0}}"#);
        for step in 1..12 {
            let body = agent_step(step);
            assert_eq!(
                prompt_tokens_of(&cached, &body),
                prompt_tokens_of(&uncached, &body),
                "step {step}"
            );
        }
        let mut stats = FakeHost::default();
        cached.report_count_cache(&mut stats);
        let texts = |source: &str| {
            stats.counter(&format!("tokenfuse_count_cache_texts.source=.={source};.;"))
        };
        // Turns are stored on their second sighting and served from the third on.
        assert!(
            texts("cache") > 2 * texts("tokenizer"),
            "{:?}",
            stats.counters
        );
        assert!(stats.gauges["tokenfuse_count_cache_bytes"] > 0);
        let mut none = FakeHost::default();
        uncached.report_count_cache(&mut none);
        assert!(none.counters.is_empty() && none.gauges.is_empty());
    }

    #[test]
    fn a_reject_budget_reads_a_known_account_once_to_reserve_and_once_to_settle() {
        let f = filter(
            r#"{"api":"v1","budgets":[{"name":"minute","key":"header:x-tenant","window":"minute","base":1000}]}"#,
        );
        let shared = FakeHost::default();
        let reads = |first: bool| {
            let mut h = budget_host("acme", &chat_with(10), &shared);
            let mut ex = Exchange::new(f.clone(), 1);
            assert_eq!(send_request(&mut ex, &mut h, 64), Action::Continue);
            let reserve = h.shared_reads.get();
            respond(
                &mut ex,
                &mut h,
                "200",
                "application/json",
                br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
                64,
            );
            assert!(first || h.resp_header("x-ratelimit-remaining-tokens").is_some());
            (reserve, h.shared_reads.get() - reserve)
        };
        // The first request finds no account: it is counted against the key cap and
        // created before the reservation.
        let (reserve, settle) = reads(true);
        assert!(reserve > 1, "{reserve}");
        assert_eq!(settle, 1);
        // Later ones: the VM knows the account exists, and no budget can reroute, so the
        // read-only planning pass is skipped: one read inside the reservation's CAS loop.
        assert_eq!(reads(false), (1, 1));
        assert_eq!(minute_used(&shared, &f, "acme"), 26);
    }

    #[test]
    fn a_reroute_budget_still_plans_with_a_read_only_pass() {
        let f = filter(BUDGETS);
        let shared = FakeHost::default();
        for expected in [None, Some(4)] {
            let mut h = budget_host("acme", &chat_with(10), &shared);
            let mut ex = Exchange::new(f.clone(), 1);
            assert_eq!(send_request(&mut ex, &mut h, 64), Action::Continue);
            // Two budgets, each read in both passes once the keys are known.
            if let Some(n) = expected {
                assert_eq!(h.shared_reads.get(), n);
            }
        }
    }

    #[test]
    fn an_exhausted_budget_answers_429_with_openai_headers_and_body() {
        let f = filter(BUDGETS);
        let shared = FakeHost::default();
        let mut h = budget_host("acme", &chat_with(995), &shared);
        let mut ex = Exchange::new(f.clone(), 1);
        send_request(&mut ex, &mut h, 64);
        let reply = h.reply.clone().expect("a 429");
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("retry-after"), Some("30"));
        assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("1000"));
        assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some("1000"));
        assert_eq!(reply.header("x-ratelimit-reset-tokens"), Some("30s"));
        assert_eq!(reply.header("x-tokenfuse-budget"), Some("minute"));
        // 1003 tokens can never fit a 1000-token window at 90%: no point retrying.
        assert_eq!(reply.header("x-should-retry"), Some("false"));
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert_eq!(v["error"]["type"], "tokens");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("priority p1"));
        assert_eq!(minute_used(&shared, &f, "acme"), 0);
        ex.on_done(&mut h);
        assert_eq!(
            h.counter_sum("tokenfuse_requests", &[]),
            0,
            "a refused request is not an exchange"
        );
    }

    #[test]
    fn a_spent_reroute_budget_rewrites_model_route_and_content_length() {
        let f = filter(BUDGETS);
        let shared = FakeHost::default();
        let mut h = budget_host("thrifty", &chat_with(100), &shared);
        let mut ex = Exchange::new(f, 1);
        assert_eq!(send_request(&mut ex, &mut h, 64), Action::Continue);
        let sent: serde_json::Value = serde_json::from_slice(&h.request_body).unwrap();
        assert_eq!(sent["model"], "gpt-4o-mini");
        assert_eq!(
            h.req_header("content-length"),
            Some(h.request_body.len().to_string())
        );
        assert_eq!(
            h.req_header("x-tokenfuse-route").as_deref(),
            Some("economy")
        );
        assert_eq!(h.route_cache_cleared, 1);
        respond(
            &mut ex,
            &mut h,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
            10,
        );
        assert_eq!(
            h.resp_header(REROUTED_HEADER).as_deref(),
            Some("gpt-4o-mini")
        );
        // Stats follow the model that served the request.
        assert_eq!(tokens(&h, "completion", "provider"), 5);
        assert_eq!(
            h.counter_sum("tokenfuse_tokens", &["model=.=gpt-4o-mini;"]),
            13
        );
    }

    #[test]
    fn oversize_conversations_are_truncated_to_the_cap() {
        let f = filter(BUDGETS);
        let shared = FakeHost::default();
        let mut messages = vec![serde_json::json!({"role":"system","content":"be brief"})];
        for i in 0..1000 {
            messages.push(serde_json::json!({"role":"user","content":format!("message {i} with several words in it")}));
        }
        let body =
            serde_json::json!({"model":"gpt-4o","max_tokens":100,"messages":messages}).to_string();
        let mut h = budget_host("bigco", &body, &shared);
        let mut ex = Exchange::new(f.clone(), 1);
        assert_eq!(send_request(&mut ex, &mut h, 4096), Action::Continue);
        let sent: serde_json::Value = serde_json::from_slice(&h.request_body).unwrap();
        let kept = sent["messages"].as_array().unwrap();
        assert!(kept.len() < 1001 && kept.len() > 2, "kept {}", kept.len());
        assert_eq!(kept[0]["role"], "system");
        assert_eq!(
            kept.last().unwrap()["content"],
            "message 999 with several words in it"
        );
        assert_eq!(
            h.req_header("content-length"),
            Some(h.request_body.len().to_string())
        );
        assert_eq!(
            h.counter_sum("tokenfuse_decisions", &["decision=.=truncated;"]),
            1
        );
        assert!(h.reply.is_none());
        let prompt: u64 = h.counter_sum("tokenfuse_decisions", &[]);
        assert_eq!(prompt, 2, "truncated, then allowed");
        respond(
            &mut ex,
            &mut h,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
            100,
        );
        let header: u64 = h
            .resp_header(PROMPT_TOKENS_HEADER)
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            header + 100 <= 5000,
            "the new prompt count fits the cap: {header}"
        );
    }

    #[test]
    fn upstream_errors_refund_the_reservation() {
        let f = filter(BUDGETS);
        let shared = FakeHost::default();
        let mut h = budget_host("acme", &chat_with(300), &shared);
        let mut ex = Exchange::new(f.clone(), 1);
        send_request(&mut ex, &mut h, 64);
        assert_eq!(minute_used(&shared, &f, "acme"), 308);
        respond(&mut ex, &mut h, "503", "application/json", b"{}", 10);
        assert_eq!(minute_used(&shared, &f, "acme"), 0);
    }

    #[test]
    fn a_client_gone_before_the_response_is_charged_its_reservation_unless_told_to_refund() {
        // The provider usually generated (and bills) the answer by then.
        let f = filter(BUDGETS);
        let shared = FakeHost::default();
        let mut h = budget_host("acme", &chat_with(300), &shared);
        let mut ex = Exchange::new(f.clone(), 2);
        send_request(&mut ex, &mut h, 64);
        ex.on_done(&mut h);
        assert_eq!(minute_used(&shared, &f, "acme"), 308);
        let refunding =
            BUDGETS.replacen(r#"{"api":"v1","#, r#"{"api":"v1","abandoned":"refund","#, 1);
        let f = filter(&refunding);
        let shared = FakeHost::default();
        let mut h = budget_host("acme", &chat_with(300), &shared);
        let mut ex = Exchange::new(f.clone(), 3);
        send_request(&mut ex, &mut h, 64);
        ex.on_done(&mut h);
        assert_eq!(minute_used(&shared, &f, "acme"), 0);
    }

    #[test]
    fn a_client_abort_mid_stream_is_charged_for_what_was_streamed() {
        let f = filter(BUDGETS);
        let shared = FakeHost::default();
        let mut h = budget_host("acme", &chat_with(300), &shared);
        let mut ex = Exchange::new(f.clone(), 1);
        send_request(&mut ex, &mut h, 64);
        respond_cut(
            &mut ex,
            &mut h,
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tiktoken is great!\"}}]}\n\n",
        );
        assert_eq!(minute_used(&shared, &f, "acme"), 8 + 6);
    }

    #[test]
    fn an_unreadable_response_keeps_the_reservation() {
        let f = filter(BUDGETS);
        let shared = FakeHost::default();
        let mut h = budget_host("acme", &chat_with(300), &shared);
        let mut ex = Exchange::new(f.clone(), 1);
        send_request(&mut ex, &mut h, 64);
        respond(
            &mut ex,
            &mut h,
            "200",
            "application/json",
            b"<html>not json</html>",
            10,
        );
        assert_eq!(minute_used(&shared, &f, "acme"), 308);
    }

    #[test]
    fn admin_topup_through_the_exchange_never_reaches_upstream() {
        let f = filter(BUDGETS);
        let body = br#"{"budget":"minute","key":"acme","amount":250}"#;
        let mut h = FakeHost::post("/admin/topup", body);
        h.request_headers
            .push(("authorization".into(), "Bearer 0123456789abcdef".into()));
        h.now_ms.set(1_800_000_030_000);
        let mut ex = Exchange::new(f, 1);
        assert_eq!(ex.on_request_headers(&mut h, false), Action::Pause);
        assert_eq!(ex.on_request_body(&mut h, body.len(), true), Action::Pause);
        let reply = h.reply.clone().unwrap();
        assert_eq!(reply.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(v["tiers"]["elastic"]["balance"], 250);
    }

    #[test]
    fn stats_carry_the_tenant_and_budget_gauges_follow_each_key() {
        let f = filter(BUDGETS);
        let shared = FakeHost::default();
        let mut h = budget_host("acme", &chat_with(100), &shared);
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut h, 64);
        assert_eq!(
            h.gauges
                .get("tokenfuse_budget_used.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;"),
            Some(&108)
        );
        respond(
            &mut ex,
            &mut h,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
            10,
        );
        assert_eq!(
            h.gauges
                .get("tokenfuse_budget_used.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;"),
            Some(&13)
        );
        assert_eq!(
            h.gauges
                .get("tokenfuse_budget_limit.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;"),
            Some(&1000)
        );
        assert_eq!(
            h.gauges.get(
                "tokenfuse_budget_remaining.budget=.=minute;.;tenant=.=acme;.;unit=.=tokens;.;"
            ),
            Some(&987)
        );
        assert_eq!(
            h.counter_sum("tokenfuse_tokens.tenant=.=acme;", &["kind=.=prompt;"]),
            8
        );
        assert_eq!(h.counter_sum("tokenfuse_requests.tenant=.=acme;", &[]), 1);
        assert_eq!(
            h.counter_sum(
                "tokenfuse_decisions.tenant=.=acme;",
                &["decision=.=allowed;"]
            ),
            1
        );
    }

    #[test]
    fn the_tenant_tag_can_be_switched_off() {
        let f = filter(&BUDGETS.replacen(
            r#""api":"v1","#,
            r#""api":"v1","stats":{"tenant":"off"},"#,
            1,
        ));
        let shared = FakeHost::default();
        let mut h = budget_host("acme", &chat_with(100), &shared);
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut h, 64);
        respond(
            &mut ex,
            &mut h,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":5}}"#,
            10,
        );
        assert!(
            h.counters.keys().all(|k| !k.contains("tenant=")),
            "{:?}",
            h.counters.keys()
        );
    }

    #[test]
    fn trailers_end_the_request_body_so_it_is_still_counted() {
        let f = default_filter();
        let mut host = FakeHost::post("/v1/chat/completions", CHAT.as_bytes());
        let mut ex = Exchange::new(f, 1);
        assert_eq!(ex.on_request_headers(&mut host, false), Action::Pause);
        assert_eq!(
            ex.on_request_body(&mut host, CHAT.len(), false),
            Action::Pause
        );
        assert_eq!(ex.on_request_trailers(&mut host), Action::Continue);
        respond(
            &mut ex,
            &mut host,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":1}}"#,
            100,
        );
        assert_eq!(host.resp_header(PROMPT_TOKENS_HEADER).as_deref(), Some("8"));
    }

    #[test]
    fn a_client_cannot_set_the_reroute_header_itself() {
        let f = filter(BUDGETS);
        let shared = FakeHost::default();
        let mut h = budget_host("acme", &chat_with(10), &shared);
        h.request_headers
            .push(("x-tokenfuse-route".into(), "economy".into()));
        let mut ex = Exchange::new(f, 1);
        assert_eq!(send_request(&mut ex, &mut h, 64), Action::Continue);
        assert!(h.req_header("x-tokenfuse-route").is_none());
    }

    #[test]
    fn count_and_reject_mode_lets_headers_go_and_still_judges_the_body() {
        let config = r#"{"api":"v1","hold_request_headers":false,
            "budgets":[{"name":"m","key":"header:x-tenant","window":"minute","base":1000}]}"#;
        let f = filter(config);
        let shared = FakeHost::default();
        let mut h = budget_host("acme", &chat_with(10), &shared);
        let mut ex = Exchange::new(f.clone(), 1);
        assert_eq!(ex.on_request_headers(&mut h, false), Action::Continue);
        let n = h.request_body.len();
        assert_eq!(ex.on_request_body(&mut h, n / 2, false), Action::Pause);
        assert_eq!(ex.on_request_body(&mut h, n, true), Action::Continue);
        assert_eq!(minute_used(&shared, &f, "acme"), 18);
        let mut h = budget_host("acme", &chat_with(2000), &shared);
        let mut ex = Exchange::new(f, 2);
        assert_eq!(ex.on_request_headers(&mut h, false), Action::Continue);
        let n = h.request_body.len();
        ex.on_request_body(&mut h, n, true);
        assert_eq!(h.reply.as_ref().map(|r| r.status), Some(429));
    }

    const GLOBAL: &str = r#"{"api":"v1",
        "rate_limit_service":{"cluster":"rls","domain":"tf","timeout_ms":80,"on_failure":"closed"},
        "budgets":[{"name":"minute","key":"header:x-tenant","window":"minute","base":1000},
                   {"name":"daily","key":"header:x-tenant","backend":"global","max_request_tokens":4000}]}"#;

    fn global_request(config: &str, shared: &FakeHost) -> (Rc<Filter>, Exchange, FakeHost) {
        let f = filter(config);
        let h = budget_host("acme", &chat_with(100), shared);
        let ex = Exchange::new(f.clone(), 1);
        (f, ex, h)
    }

    fn rls_answer(ex: &mut Exchange, h: &mut FakeHost, call: usize, grpc_status: u32, body: &[u8]) {
        h.grpc_body = body.to_vec();
        let token = h.grpc_calls[call].token;
        ex.on_grpc_response(h, token, grpc_status, body.len());
    }

    #[test]
    fn a_global_budget_holds_the_request_until_the_service_admits_it() {
        let shared = FakeHost::default();
        let (f, mut ex, mut h) = global_request(GLOBAL, &shared);
        assert_eq!(send_request(&mut ex, &mut h, 1 << 20), Action::Pause);
        assert_eq!(h.grpc_calls.len(), 1);
        let call = &h.grpc_calls[0];
        assert_eq!(
            (
                call.cluster.as_str(),
                call.service.as_str(),
                call.method.as_str()
            ),
            ("rls", rls::SERVICE, rls::METHOD)
        );
        assert_eq!(call.timeout_ms, 80);
        let service = f.config.rate_limit_service.as_ref().unwrap();
        assert_eq!(
            call.message,
            global::request_message(service, "daily", "acme", 108),
            "prompt 8 + max_tokens 100"
        );
        assert_eq!(
            minute_used(&shared, &f, "acme"),
            108,
            "local reserved first"
        );
        assert_eq!(h.resumed, 0);
        assert_eq!(
            h.counter_sum("tokenfuse_decisions", &[]),
            0,
            "not decided yet"
        );
        rls_answer(&mut ex, &mut h, 0, 0, &[0x08, 1]);
        assert_eq!(h.resumed, 1);
        assert!(h.reply.is_none());
        assert_eq!(
            h.counter_sum("tokenfuse_decisions", &["decision=.=allowed;"]),
            1
        );
        // Cost above the hold (8 + 300 > 108): the difference is queued for the root.
        respond(
            &mut ex,
            &mut h,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":300}}"#,
            7,
        );
        let mut queue = f.settlements.borrow_mut();
        assert_eq!(queue.len(), 1);
        let before = h.grpc_calls.len();
        queue.flush(&mut h, &f.config);
        assert_eq!(
            h.grpc_calls[before].message,
            global::request_message(service, "daily", "acme", 200)
        );
    }

    #[test]
    fn a_cost_below_the_hold_is_counted_as_unreturned() {
        let shared = FakeHost::default();
        let (f, mut ex, mut h) = global_request(GLOBAL, &shared);
        send_request(&mut ex, &mut h, 1 << 20);
        rls_answer(&mut ex, &mut h, 0, 0, &[0x08, 1]);
        respond(
            &mut ex,
            &mut h,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":2}}"#,
            7,
        );
        assert!(f.settlements.borrow().is_empty());
        assert_eq!(
            h.counter("tokenfuse_global_unreturned.budget=.=daily;.;"),
            98
        );
        assert_eq!(
            minute_used(&shared, &f, "acme"),
            10,
            "local settles exactly"
        );
    }

    #[test]
    fn over_limit_answers_429_and_gives_the_local_reservation_back() {
        let shared = FakeHost::default();
        let (f, mut ex, mut h) = global_request(GLOBAL, &shared);
        send_request(&mut ex, &mut h, 1 << 20);
        // OVER_LIMIT with a status: limit 5000, 0 left, resets in 120 s.
        let limit = [0x08, 0x88, 0x27, 0x10, 4];
        let reset = [0x08, 120];
        let status = [
            &[0x08, 2, 0x12, limit.len() as u8][..],
            &limit,
            &[0x18, 0, 0x22, reset.len() as u8],
            &reset,
        ]
        .concat();
        let body = [&[0x08, 2, 0x12, status.len() as u8][..], &status].concat();
        rls_answer(&mut ex, &mut h, 0, 0, &body);
        let reply = h.reply.clone().expect("a local reply");
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("retry-after"), Some("120"));
        assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("5000"));
        assert_eq!(reply.header("x-ratelimit-remaining-tokens"), Some("0"));
        assert_eq!(reply.header("x-tokenfuse-budget"), Some("daily"));
        assert_eq!(
            reply.header("x-should-retry"),
            Some("false"),
            "120 s > 60 s"
        );
        assert!(String::from_utf8_lossy(&reply.body).contains("global budget 'daily'"));
        assert_eq!(h.resumed, 0);
        assert_eq!(minute_used(&shared, &f, "acme"), 0, "local refunded");
        assert_eq!(
            h.counter_sum(
                "tokenfuse_decisions",
                &["decision=.=rejected;", "budget=.=daily;"]
            ),
            1
        );
        assert_eq!(h.counter_sum("tokenfuse_decisions", &[]), 1, "decided once");
        ex.on_done(&mut h);
        assert!(f.settlements.borrow().is_empty());
    }

    #[test]
    fn a_timeout_fails_closed_with_503_when_configured() {
        let shared = FakeHost::default();
        let (f, mut ex, mut h) = global_request(GLOBAL, &shared);
        send_request(&mut ex, &mut h, 1 << 20);
        rls_answer(&mut ex, &mut h, 0, 4, &[]);
        assert_eq!(h.reply.as_ref().map(|r| r.status), Some(503));
        assert_eq!(minute_used(&shared, &f, "acme"), 0);
        assert_eq!(
            h.counter_sum(
                "tokenfuse_global_errors",
                &["budget=.=daily;", "reason=.=timeout"]
            ),
            1
        );
        assert_eq!(
            h.counter_sum("tokenfuse_decisions", &["decision=.=unavailable;"]),
            1
        );
    }

    #[test]
    fn a_failure_fails_open_by_default_and_holds_nothing() {
        let config = GLOBAL.replace(r#","on_failure":"closed""#, "");
        let shared = FakeHost::default();
        let (f, mut ex, mut h) = global_request(&config, &shared);
        send_request(&mut ex, &mut h, 1 << 20);
        rls_answer(&mut ex, &mut h, 0, 14, &[]);
        assert!(h.reply.is_none());
        assert_eq!(h.resumed, 1);
        assert_eq!(h.counter("tokenfuse_fail_open.budget=.=daily;.;"), 1);
        respond(
            &mut ex,
            &mut h,
            "200",
            "application/json",
            br#"{"usage":{"prompt_tokens":8,"completion_tokens":500}}"#,
            64,
        );
        assert!(
            f.settlements.borrow().is_empty(),
            "nothing was held, so nothing is settled"
        );
    }

    #[test]
    fn a_call_that_cannot_be_sent_applies_the_failure_mode_without_pausing() {
        let config = GLOBAL.replace(r#""closed""#, r#""open""#);
        let shared = FakeHost::default();
        let (_f, mut ex, mut h) = global_request(&config, &shared);
        h.grpc_broken = true;
        assert_eq!(send_request(&mut ex, &mut h, 1 << 20), Action::Continue);
        assert_eq!(
            h.counter_sum("tokenfuse_global_errors", &["reason=.=dispatch"]),
            1
        );
        assert_eq!(h.resumed, 0, "never paused, nothing to resume");
    }

    #[test]
    fn a_garbled_or_unknown_answer_is_a_failure_not_an_admission() {
        for body in [&[0x12, 9][..], &[][..], &[0x08, 0][..]] {
            let shared = FakeHost::default();
            let (_f, mut ex, mut h) = global_request(GLOBAL, &shared);
            send_request(&mut ex, &mut h, 1 << 20);
            rls_answer(&mut ex, &mut h, 0, 0, body);
            assert_eq!(h.reply.as_ref().map(|r| r.status), Some(503), "{body:?}");
        }
    }

    #[test]
    fn a_client_that_leaves_during_the_check_gets_its_local_reservation_back() {
        let shared = FakeHost::default();
        let (f, mut ex, mut h) = global_request(GLOBAL, &shared);
        send_request(&mut ex, &mut h, 1 << 20);
        ex.on_done(&mut h);
        assert_eq!(minute_used(&shared, &f, "acme"), 0);
        // A late answer for a finished exchange changes nothing.
        rls_answer(&mut ex, &mut h, 0, 0, &[0x08, 1]);
        assert_eq!(h.resumed, 0);
        assert_eq!(h.counter_sum("tokenfuse_decisions", &[]), 0);
    }

    #[test]
    fn the_per_request_cap_of_a_global_budget_applies_before_asking() {
        let shared = FakeHost::default();
        let f = filter(GLOBAL);
        let mut h = budget_host("acme", &chat_with(5000), &shared);
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut h, 1 << 20);
        assert_eq!(h.reply.as_ref().map(|r| r.status), Some(400));
        assert!(h.grpc_calls.is_empty());
    }

    #[test]
    fn a_request_larger_than_a_call_can_carry_is_refused_without_a_call() {
        let config = GLOBAL.replace(r#","max_request_tokens":4000"#, "");
        let config = config.replace(r#""base":1000"#, r#""base":1e15"#);
        let shared = FakeHost::default();
        let f = filter(&config);
        let mut h = budget_host("acme", &chat_with(5_000_000_000), &shared);
        let mut ex = Exchange::new(f, 1);
        send_request(&mut ex, &mut h, 1 << 20);
        let reply = h.reply.clone().unwrap();
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("x-should-retry"), Some("false"));
        assert!(h.grpc_calls.is_empty());
    }

    #[test]
    fn every_global_budget_is_asked_and_any_refusal_wins() {
        let config = r#"{"api":"v1","rate_limit_service":{"cluster":"rls"},
            "prices":{"*":{"input":1,"output":1}},
            "budgets":[{"name":"tok","key":"header:x-tenant","backend":"global"},
                       {"name":"usd","key":"constant:all","backend":"global","unit":"usd"}]}"#;
        let shared = FakeHost::default();
        let (f, mut ex, mut h) = global_request(config, &shared);
        assert_eq!(send_request(&mut ex, &mut h, 1 << 20), Action::Pause);
        assert_eq!(h.grpc_calls.len(), 2);
        let service = f.config.rate_limit_service.as_ref().unwrap();
        assert_eq!(
            h.grpc_calls[1].message,
            global::request_message(service, "usd", "all", 108),
            "$1/M each way: 108 micro-USD"
        );
        rls_answer(&mut ex, &mut h, 1, 0, &[0x08, 1]);
        assert!(
            h.reply.is_none() && h.resumed == 0,
            "still waiting for the first"
        );
        rls_answer(&mut ex, &mut h, 0, 0, &[0x08, 2]);
        assert_eq!(h.reply.as_ref().map(|r| r.status), Some(429));
        assert_eq!(
            h.counter("tokenfuse_global_unreturned.budget=.=usd;.;"),
            108,
            "the admitting budget keeps its hits"
        );
    }
}
