//! The HTTP API (axum).

use crate::error::ProtocolError;
use crate::parse::{self, MAX_BODY};
use crate::token::{self, TokenClaims};
use crate::{Kbs, SESSION_COOKIE};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use std::sync::Arc;
use std::time::SystemTime;

type Shared = State<Arc<Kbs>>;
type ApiResult<T = Response> = Result<T, ProtocolError>;

impl IntoResponse for ProtocolError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        tracing::warn!(status = self.status, kind = self.kind, detail = %self.detail, "kbs request refused");
        (status, axum::Json(self.body())).into_response()
    }
}

pub(crate) fn router(kbs: Arc<Kbs>) -> Router {
    routes()
        .fallback(|| async { ProtocolError::not_found("NotFound", "no such endpoint") })
        .with_state(kbs)
}

/// The broker's routes without a fallback, for mounting next to another service's routes.
pub(crate) fn embeddable(kbs: Arc<Kbs>) -> Router {
    routes().with_state(kbs)
}

fn routes() -> Router<Arc<Kbs>> {
    Router::new()
        .route("/kbs/v0/auth", post(auth))
        .route("/kbs/v0/attest", post(attest))
        .route(
            "/kbs/v0/resource/{repo}/{kind}/{tag}",
            get(get_resource).put(put_resource).delete(delete_resource),
        )
        .route("/kbs/v0/resource", get(list_resources))
        .route("/kbs/v0/reference-value", get(list_reference_values))
        .route(
            "/kbs/v0/reference-value/{name}",
            get(get_reference_value).put(put_reference_value),
        )
        .route(
            "/kbs/v0/attestation-policy",
            get(get_attestation_policy).put(put_attestation_policy),
        )
        .route(
            "/kbs/v0/resource-policy",
            get(get_resource_policy).put(put_resource_policy),
        )
}

/// Read a body of at most [`MAX_BODY`] bytes; larger ones are 413.
async fn read_body(headers: &HeaderMap, body: Body) -> ApiResult<Bytes> {
    let too_large = || {
        ProtocolError::new(
            413,
            "PayloadTooLarge",
            format!("request body exceeds {MAX_BODY} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > MAX_BODY as u64 {
            return Err(too_large());
        }
    }
    match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let inner = e.into_inner();
            if inner
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(too_large())
            } else {
                Err(ProtocolError::bad_request(
                    "MalformedRequest",
                    format!("could not read the request body: {inner}"),
                ))
            }
        }
    }
}

fn json_response<T: serde::Serialize>(v: &T) -> Response {
    axum::Json(v).into_response()
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| parse::session_cookie(v).map(str::to_string))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

// ---------------------------------------------------------------------------------------------
// Attestation protocol.

async fn auth(State(kbs): Shared, headers: HeaderMap, body: Body) -> ApiResult {
    let body = read_body(&headers, body).await?;
    let (req, tee) = parse::parse_request(&body)?;
    if !kbs.verifiers.contains_key(&tee) {
        return Err(ProtocolError::bad_request(
            "UnsupportedTee",
            format!(
                "this broker has no verifier for TEE {} (available: {})",
                req.tee,
                kbs.supported_tees()
                    .iter()
                    .map(|t| crate::parse::kbs_tee(*t).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let alg = parse::select_hash_algorithm(&req.extra_params)?;
    use base64::Engine;
    let nonce = base64::engine::general_purpose::STANDARD.encode(crate::jwe::random_bytes::<32>());
    let id = kbs
        .sessions
        .create(tee, alg, nonce.clone(), kbs.cfg.session_ttl)?;
    let challenge = kbs_types::Challenge {
        nonce,
        extra_params: serde_json::json!({
            parse::SELECTED_HASH_ALGORITHM: alg.as_ref(),
            parse::VEIL_INIT_DATA: parse::VEIL_INIT_DATA_IN_ADDITIONAL_EVIDENCE,
        }),
    };
    let mut resp = json_response(&challenge);
    let set_cookie = format!(
        "{SESSION_COOKIE}={id}; Path=/kbs; HttpOnly; SameSite=Strict; Max-Age={}",
        kbs.cfg.session_ttl.as_secs()
    );
    let v =
        HeaderValue::from_str(&set_cookie).map_err(|e| ProtocolError::internal(e.to_string()))?;
    resp.headers_mut().insert(header::SET_COOKIE, v);
    tracing::info!(tee = %tee, "kbs challenge issued");
    Ok(resp)
}

async fn attest(State(kbs): Shared, headers: HeaderMap, body: Body) -> ApiResult {
    let body = read_body(&headers, body).await?;
    let id = cookie(&headers).ok_or_else(|| {
        ProtocolError::unauthorized(
            "MissingCookie",
            "no kbs-session-id cookie: call /auth first",
        )
    })?;
    let parsed = parse::parse_attestation(&body)?;
    let rd = &parsed.attestation.runtime_data;
    let (tee, alg) = kbs.sessions.take_nonce(&id, &rd.nonce, kbs.cfg.nonce_ttl)?;
    let verifier = kbs.verifiers.get(&tee).ok_or_else(|| {
        ProtocolError::bad_request("UnsupportedTee", format!("no verifier for TEE {tee}"))
    })?;
    let digest = parse::runtime_data_digest(
        alg,
        &rd.nonce,
        &rd.tee_pubkey,
        &parsed.attestation.tee_evidence.additional_evidence,
    );
    let expected = veil_attest::pad_report_data(tee, &digest)
        .map_err(|e| ProtocolError::internal(e.to_string()))?;
    let evidence = &parsed.attestation.tee_evidence.primary_evidence;
    let claims = verifier
        .verify(evidence, &expected, SystemTime::now())
        .map_err(|e| match e {
            veil_attest::Error::Malformed { .. } => {
                ProtocolError::bad_request("MalformedEvidence", e.to_string())
            }
            veil_attest::Error::ReportDataMismatch { .. } => ProtocolError::unauthorized(
                "BindingMismatch",
                format!(
                    "evidence does not bind this session's runtime data (nonce, key and \
                     additional evidence, {alg}): {e}"
                ),
            ),
            veil_attest::Error::Invalid { .. } => {
                ProtocolError::unauthorized("InvalidEvidence", e.to_string())
            }
            other => ProtocolError::internal(other.to_string()),
        })?;
    if claims.tee != tee {
        return Err(ProtocolError::unauthorized(
            "InvalidEvidence",
            format!(
                "evidence is from TEE {} but the session is for {tee}",
                claims.tee
            ),
        ));
    }
    let binding = init_data_binding(&parsed, &claims)?;
    let bound = matches!(binding, Some(b) if b != "none");
    // The assignment counts (names the tenant in the token) only when bound to the evidence.
    let assignment = match &parsed.init_data {
        Some(init) if bound => init.assignment.as_ref(),
        _ => None,
    };
    let tenant_scope = match &parsed.init_data {
        Some(init) if bound => init.tenant_scope.clone(),
        _ => None,
    };
    let input = serde_json::json!({
        "claims": claims,
        "init_data": match (assignment, &tenant_scope) {
            (Some((v, _)), _) => v.clone(),
            (None, Some(t)) => serde_json::json!({"tenant": t, "scope": parse::TENANT_SCOPE}),
            (None, None) => serde_json::json!({}),
        },
        // `tenant`: the image pins are checked later, on the stated assignment.
        "phase": if tenant_scope.is_some() { "tenant" } else { "assignment" },
        // The document's data only when it is bound to the evidence: unbound (unendorsed
        // sample) init data is whatever the client claims.
        "init_data_claims": parsed
            .init_data
            .as_ref()
            .filter(|_| matches!(binding, Some("runtime" | "launch" | "endorsed")))
            .map(|i| serde_json::json!(i.doc.data)),
        "init_data_binding": binding,
    });
    let decision = attestation_decision(&kbs, input)?;
    if !decision.allow {
        let detail = if decision.reasons.is_empty() {
            "the attestation policy denied this TEE".to_string()
        } else {
            format!("attestation policy denied: {}", decision.reasons.join("; "))
        };
        return Err(ProtocolError::forbidden("PolicyDeny", detail));
    }
    let now = token::now_secs();
    let a = assignment.map(|(_, a)| a);
    let tc = TokenClaims {
        iss: token::ISSUER.into(),
        iat: now,
        exp: now + kbs.cfg.token_ttl.as_secs().max(1),
        jti: hex::encode(crate::jwe::random_bytes::<16>()),
        tee,
        insecure: claims.insecure,
        measurement: claims.measurement.clone(),
        tenant: a.map(|a| a.tenant.clone()).or_else(|| tenant_scope.clone()),
        function: a.map(|a| a.function.clone()),
        image_digest: a.map(|a| a.image_digest.clone()),
        init_data_binding: binding.map(str::to_string),
        scope: tenant_scope
            .as_ref()
            .map(|_| parse::TENANT_SCOPE.to_string()),
        attested: tenant_scope.as_ref().map(|_| claims.clone()),
        tee_pubkey: rd.tee_pubkey.clone(),
    };
    let tok = token::sign(&kbs.token_key, &tc).map_err(ProtocolError::from)?;
    kbs.sessions.set_attested(&id, tc);
    tracing::info!(
        tee = %tee,
        tenant = a.map(|a| a.tenant.as_str()).or(tenant_scope.as_deref()).unwrap_or("-"),
        function = a.map(|a| a.function.as_str()).unwrap_or("-"),
        init_data_binding = binding.unwrap_or("-"),
        "kbs attestation accepted"
    );
    Ok(json_response(&serde_json::json!({ "token": tok })))
}

/// How the init data is bound to verified evidence, if init data was sent:
/// - `runtime`: its digest is in the additional evidence, inside the runtime data the report
///   data binds (veil's agent, which learns its assignment after boot);
/// - `launch`: its digest is the launch-time HOSTDATA (SNP) or MRCONFIGID (TDX), as
///   Confidential Containers binds a pod's init data;
/// - `endorsed`: software-TEE evidence whose host endorsement names the assignment's tenant
///   and function;
/// - `none`: unendorsed sample evidence, which binds nothing.
///
/// Hardware evidence with unbound init data, software evidence endorsed for another
/// assignment (or presenting none), are refused: a host must not be able to attach another
/// assignment to a genuine sandbox's evidence.
fn init_data_binding(
    parsed: &parse::ParsedAttestation,
    claims: &veil_attest::Claims,
) -> ApiResult<Option<&'static str>> {
    if claims.insecure {
        let assignment = parsed
            .init_data
            .as_ref()
            .and_then(|i| i.assignment.as_ref())
            .map(|(_, a)| a);
        let tenant_scope = parsed
            .init_data
            .as_ref()
            .and_then(|i| i.tenant_scope.as_ref());
        let endorsed = veil_attest::software::endorsed_for(claims);
        // Tenant scope: endorsed for the tenant and any of its functions ("*"), and only then.
        match (endorsed, tenant_scope) {
            (Some((t, f)), Some(ts)) if t == ts && f == parse::ANY_FUNCTION => {
                return Ok(Some("endorsed"))
            }
            (Some((t, f)), Some(ts)) => {
                return Err(ProtocolError::unauthorized(
                    "EndorsementMismatch",
                    format!(
                        "the host endorsed this INSECURE software-TEE sandbox for tenant {t:?}, \
                         function {f:?}, not for any function of tenant {ts:?}"
                    ),
                ))
            }
            (Some((_, f)), None) if f == parse::ANY_FUNCTION => {
                return Err(ProtocolError::unauthorized(
                    "EndorsementMismatch",
                    "an endorsement for any function of a tenant attests with tenant scope only",
                ))
            }
            _ => {}
        }
        return match (endorsed, assignment) {
            (None, _) => Ok(parsed.init_data.as_ref().map(|_| "none")),
            (Some((t, f)), Some(a)) if t == a.tenant && f == a.function => Ok(Some("endorsed")),
            (Some((t, f)), Some(a)) => Err(ProtocolError::unauthorized(
                "EndorsementMismatch",
                format!(
                    "the host endorsed this INSECURE software-TEE sandbox for tenant {t:?}, \
                     function {f:?}, not for tenant {:?}, function {:?}",
                    a.tenant, a.function
                ),
            )),
            (Some((t, f)), None) => Err(ProtocolError::unauthorized(
                "EndorsementMismatch",
                format!(
                    "the host endorsed this INSECURE software-TEE sandbox for tenant {t:?}, \
                     function {f:?}, but it presents no veil assignment in its init-data"
                ),
            )),
        };
    }
    let Some(init) = &parsed.init_data else {
        return Ok(None);
    };
    if parsed.additional.veil_init_data.is_some() {
        // parse_attestation already required it to equal the init data's digest.
        return Ok(Some("runtime"));
    }
    let launch = hex::decode(&claims.init_data).unwrap_or_default();
    if veil_attest::launch_bound(&launch, &init.digest) {
        return Ok(Some("launch"));
    }
    Err(ProtocolError::unauthorized(
        "InitDataNotBound",
        format!(
            "the init-data (digest {}) is bound neither in the runtime data ({} in the \
             additional evidence) nor at launch (the evidence's HOSTDATA/MRCONFIGID is {})",
            hex::encode(&init.digest),
            parse::VEIL_INIT_DATA,
            if claims.init_data.is_empty() {
                "empty"
            } else {
                claims.init_data.as_str()
            }
        ),
    ))
}

/// Evaluate the attestation policy on `input` (claims, init data, binding, phase), completed
/// with the reference values and the broker's configuration.
fn attestation_decision(kbs: &Kbs, mut input: serde_json::Value) -> ApiResult<crate::Decision> {
    let refs = kbs.store.reference_values().map_err(ProtocolError::from)?;
    input["reference_values"] = serde_json::json!(refs);
    input["config"] = serde_json::json!({
        "allow_insecure": kbs.cfg.allow_insecure_software_tee,
        "allow_unendorsed_sample": kbs.cfg.allow_unendorsed_sample,
    });
    let policy = kbs
        .attestation_policy
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    policy
        .evaluate(input)
        .map_err(|e| ProtocolError::internal(format!("attestation policy failed: {e}")))
}

/// A tenant-attested sandbox's statement of its assignment: signed by the attested key, for the
/// token's tenant, and allowed by the attestation policy on the attested claims (its image pins
/// apply now). The claims then name the function and image digest, for the resource policy.
fn stated_assignment(
    kbs: &Kbs,
    claims: &mut TokenClaims,
    credential: &str,
    statement: &str,
) -> ApiResult<()> {
    let now = token::now_secs();
    let key = crate::decisions::DecisionCache::key(credential, statement);
    if let Some(v) = kbs.decisions.get(&key, now) {
        claims.function = Some(v.function);
        claims.image_digest = Some(v.image_digest);
        return Ok(());
    }
    // Read before the policy and reference values are, so a change meanwhile voids the verdict.
    let generation = kbs.decisions.generation();
    let v = crate::statement::verify(&claims.tee_pubkey, statement)
        .map_err(|e| ProtocolError::unauthorized("InvalidStatement", e))?;
    let a = parse::check_stated_assignment(&v)?;
    if claims.tenant.as_deref() != Some(a.tenant.as_str()) {
        return Err(ProtocolError::forbidden(
            "PolicyDeny",
            format!(
                "the statement names tenant {:?}, but this sandbox attested to tenant {:?}",
                a.tenant, claims.tenant
            ),
        ));
    }
    let attested = claims.attested.clone().ok_or_else(|| {
        ProtocolError::unauthorized("TokenInvalid", "a tenant-scoped token without its claims")
    })?;
    // The policy sees the stated assignment as it would see it in init data: as the assignment
    // object, and as `veil.*` data claims.
    let mut v = v;
    if let Some(o) = v.as_object_mut() {
        o.retain(|_, x| !x.is_null());
    }
    let claims_map = parse::veil_data(&v);
    let input = serde_json::json!({
        "claims": attested,
        "init_data": v,
        "init_data_claims": claims_map,
        "init_data_binding": "statement",
        "phase": "assignment",
    });
    let decision = attestation_decision(kbs, input)?;
    if !decision.allow {
        return Err(ProtocolError::forbidden(
            "PolicyDeny",
            format!(
                "attestation policy denied the stated assignment: {}",
                decision.reasons.join("; ")
            ),
        ));
    }
    kbs.decisions.put(
        key,
        crate::decisions::Verdict {
            function: a.function.clone(),
            image_digest: a.image_digest.clone(),
            expires_at: claims.exp,
        },
        generation,
        now,
    );
    claims.function = Some(a.function);
    claims.image_digest = Some(a.image_digest);
    Ok(())
}

async fn get_resource(
    State(kbs): Shared,
    Path((repo, kind, tag)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let (claims, credential): (TokenClaims, String) = if let Some(t) = bearer(&headers) {
        let c = kbs
            .verify_token(t)
            .map_err(|e| ProtocolError::unauthorized("TokenInvalid", e))?;
        (c, format!("token:{t}"))
    } else if let Some(id) = cookie(&headers) {
        let c = kbs.sessions.attested(&id)?;
        (c, format!("session:{id}"))
    } else {
        return Err(ProtocolError::unauthorized(
            "MissingCookie",
            "an attested session cookie or a bearer token is required",
        ));
    };
    let mut claims = claims;
    let statement = headers
        .get(crate::statement::STATEMENT_HEADER)
        .map(|v| v.to_str().unwrap_or_default().to_string());
    match (claims.scope.as_deref(), statement) {
        (Some(parse::TENANT_SCOPE), Some(st)) => {
            stated_assignment(&kbs, &mut claims, &credential, &st)?
        }
        (Some(parse::TENANT_SCOPE), None) => {
            return Err(ProtocolError::forbidden(
                "AssignmentStatementRequired",
                "this sandbox attested to its tenant only: its resource requests must state its \
                 assignment, signed with its TEE key",
            ))
        }
        (_, Some(_)) => {
            return Err(ProtocolError::bad_request(
                "UnexpectedStatement",
                "an assignment statement is only for sandboxes that attested with tenant scope",
            ))
        }
        _ => {}
    }
    let path = parse::parse_resource_path(&format!("{repo}/{kind}/{tag}"))?;
    // A sandbox bound to a tenant reads that tenant's repository only, whatever the policy.
    if let Some(tenant) = &claims.tenant {
        if path.repository != *tenant {
            return Err(ProtocolError::forbidden(
                "PolicyDeny",
                format!(
                    "resource of another tenant: {path} is not in the attested tenant's repository {tenant:?}"
                ),
            ));
        }
    }
    let policy = kbs
        .resource_policy
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let input = serde_json::json!({ "token": claims, "resource": path });
    let decision = policy
        .evaluate(input)
        .map_err(|e| ProtocolError::internal(format!("resource policy failed: {e}")))?;
    if !decision.allow {
        let detail = if decision.reasons.is_empty() {
            format!("the resource policy denied access to {path}")
        } else {
            format!("resource policy denied: {}", decision.reasons.join("; "))
        };
        return Err(ProtocolError::forbidden("PolicyDeny", detail));
    }
    let value = kbs
        .store
        .get_resource(&path.to_string())
        .map_err(ProtocolError::from)?
        .ok_or_else(|| {
            ProtocolError::not_found("ResourceNotFound", format!("no resource {path}"))
        })?;
    let jwe = crate::jwe::encrypt_resource(&claims.tee_pubkey, &value, &path.to_string())
        .map_err(|e| ProtocolError::bad_request("InvalidTeePubKey", e.to_string()))?;
    tracing::info!(
        tenant = claims.tenant.as_deref().unwrap_or("-"),
        resource = %path,
        "kbs resource released"
    );
    Ok(json_response(&jwe))
}

// ---------------------------------------------------------------------------------------------
// Admin API.

fn require_admin(kbs: &Kbs, headers: &HeaderMap) -> ApiResult<()> {
    let t = bearer(headers).ok_or_else(|| {
        ProtocolError::unauthorized("AdminAuth", "admin endpoints need an admin bearer token")
    })?;
    token::verify_admin_token(&kbs.admin_key, t)
        .map_err(|e| ProtocolError::unauthorized("AdminAuth", format!("admin token refused: {e}")))
}

async fn put_resource(
    State(kbs): Shared,
    Path((repo, kind, tag)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    require_admin(&kbs, &headers)?;
    let body = read_body(&headers, body).await?;
    let path = parse::parse_resource_path(&format!("{repo}/{kind}/{tag}"))?;
    kbs.store
        .set_resource(&path.to_string(), &body)
        .map_err(ProtocolError::from)?;
    tracing::info!(resource = %path, "kbs resource stored");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_resource(
    State(kbs): Shared,
    Path((repo, kind, tag)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    require_admin(&kbs, &headers)?;
    let path = parse::parse_resource_path(&format!("{repo}/{kind}/{tag}"))?;
    if !kbs
        .store
        .delete_resource(&path.to_string())
        .map_err(ProtocolError::from)?
    {
        return Err(ProtocolError::not_found(
            "ResourceNotFound",
            format!("no resource {path}"),
        ));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_resources(State(kbs): Shared, headers: HeaderMap) -> ApiResult {
    require_admin(&kbs, &headers)?;
    Ok(json_response(
        &kbs.list_resources().map_err(ProtocolError::from)?,
    ))
}

async fn put_reference_value(
    State(kbs): Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    require_admin(&kbs, &headers)?;
    let body = read_body(&headers, body).await?;
    let values = parse::parse_reference_values(&name, &body)?;
    kbs.set_reference_values(&name, &values)
        .map_err(ProtocolError::from)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_reference_value(
    State(kbs): Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    require_admin(&kbs, &headers)?;
    let all = kbs.reference_values().map_err(ProtocolError::from)?;
    let v = all.get(&name).ok_or_else(|| {
        ProtocolError::not_found("NotFound", format!("no reference value {name:?}"))
    })?;
    Ok(json_response(v))
}

async fn list_reference_values(State(kbs): Shared, headers: HeaderMap) -> ApiResult {
    require_admin(&kbs, &headers)?;
    Ok(json_response(
        &kbs.reference_values().map_err(ProtocolError::from)?,
    ))
}

fn rego_text(body: &Bytes) -> ApiResult<&str> {
    std::str::from_utf8(body)
        .map_err(|_| ProtocolError::bad_request("PolicyInvalid", "the policy is not UTF-8 text"))
}

async fn put_attestation_policy(State(kbs): Shared, headers: HeaderMap, body: Body) -> ApiResult {
    require_admin(&kbs, &headers)?;
    let body = read_body(&headers, body).await?;
    kbs.set_attestation_policy(rego_text(&body)?)
        .map_err(ProtocolError::from)?;
    tracing::info!("kbs attestation policy replaced");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn put_resource_policy(State(kbs): Shared, headers: HeaderMap, body: Body) -> ApiResult {
    require_admin(&kbs, &headers)?;
    let body = read_body(&headers, body).await?;
    kbs.set_resource_policy(rego_text(&body)?)
        .map_err(ProtocolError::from)?;
    tracing::info!("kbs resource policy replaced");
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn text(s: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], s).into_response()
}

async fn get_attestation_policy(State(kbs): Shared, headers: HeaderMap) -> ApiResult {
    require_admin(&kbs, &headers)?;
    Ok(text(kbs.attestation_policy()))
}

async fn get_resource_policy(State(kbs): Shared, headers: HeaderMap) -> ApiResult {
    require_admin(&kbs, &headers)?;
    Ok(text(kbs.resource_policy()))
}
