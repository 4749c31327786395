//! Tenants as a whole (operator only): `GET /v1/tenants` lists every tenant the gateway knows
//! of — by its tokens, functions, pool or local-store repositories — and
//! `DELETE /v1/tenants/<tenant>` takes one off the node:
//! 1. its tokens are revoked, so it can deploy nothing more;
//! 2. its pool is removed, destroying the sandboxes attested to it;
//! 3. its functions are deleted, their instances draining (requests in flight finish, within
//!    the drain timeout), and their logs and its pool's are forgotten; a deploy that
//!    authenticated before step 1 re-checks the tenant's tokens under the deployments lock,
//!    so it either lands before the sweep or is refused.
//!
//! Its local-store repositories stay recorded as its own, so that no other tenant takes over
//! their names (and the images under them) by pushing to them; a token created later for the
//! same name gets them back.

use crate::{api_error, bad_tenant_name, operator_only, CallerExt, Gateway, GwState};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One tenant as `GET /v1/tenants` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TenantInfo {
    /// The tenant.
    pub tenant: String,
    /// Tokens that authenticate it.
    pub tokens: usize,
    /// Its functions.
    pub functions: Vec<String>,
    /// The size of its pool of tenant-attested sandboxes, if it has one.
    pub pool_size: Option<usize>,
    /// Local-store repositories it owns.
    pub repositories: usize,
}

/// What `DELETE /v1/tenants/<tenant>` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TenantDeleted {
    /// The tenant.
    pub tenant: String,
    /// Tokens revoked.
    pub tokens_revoked: usize,
    /// Whether it had a pool (now removed, its sandboxes destroyed).
    pub pool_removed: bool,
    /// Functions deleted (their instances drained and destroyed).
    pub functions_deleted: Vec<String>,
    /// Local-store repositories it still owns (kept so that no one else takes them over).
    pub repositories_kept: usize,
}

fn entry<'a>(map: &'a mut BTreeMap<String, TenantInfo>, t: &str) -> &'a mut TenantInfo {
    map.entry(t.to_string()).or_insert_with(|| TenantInfo {
        tenant: t.to_string(),
        ..TenantInfo::default()
    })
}

/// Every tenant the gateway knows of.
pub(crate) fn tenants(gw: &Gateway) -> Vec<TenantInfo> {
    let mut map: BTreeMap<String, TenantInfo> = BTreeMap::new();
    for t in gw.auth.tokens() {
        entry(&mut map, &t.tenant).tokens += 1;
    }
    for f in gw.functions.list() {
        entry(&mut map, &f.record.tenant)
            .functions
            .push(f.record.name);
    }
    for p in gw.node.tenant_pools() {
        entry(&mut map, &p.config.tenant).pool_size = Some(p.config.size);
    }
    for owner in gw.auth.repositories().values() {
        entry(&mut map, owner).repositories += 1;
    }
    map.into_values().collect()
}

pub(crate) async fn list(State(gw): GwState, caller: CallerExt) -> Response {
    if let Some(r) = operator_only(&caller) {
        return r;
    }
    Json(tenants(&gw)).into_response()
}

pub(crate) async fn delete(
    State(gw): GwState,
    caller: CallerExt,
    Path(tenant): Path<String>,
) -> Response {
    if let Some(r) = operator_only(&caller) {
        return r;
    }
    if let Some(r) = bad_tenant_name(&tenant) {
        return r;
    }
    if !tenants(&gw).iter().any(|t| t.tenant == tenant) {
        return api_error(
            StatusCode::NOT_FOUND,
            "TENANT_NOT_FOUND",
            format!("no tenant {tenant:?}: no token, function, pool or repository names it"),
        );
    }
    match delete_tenant(&gw, &tenant).await {
        Ok(d) => Json(d).into_response(),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, "STORAGE", e.to_string()),
    }
}

async fn delete_tenant(
    gw: &Arc<Gateway>,
    tenant: &str,
) -> Result<TenantDeleted, crate::auth::AuthError> {
    let tokens_revoked = gw.auth.revoke_tenant(tenant)?;
    let pool_removed = gw
        .node
        .tenant_pools()
        .iter()
        .any(|p| p.config.tenant == tenant);
    gw.node.remove_tenant_pool(tenant).await;
    // One pass: a deploy by the tenant's token that resolved its image before the revocation
    // re-checks the tenant's tokens under the deployments lock, so it lands before this list
    // is taken or not at all.
    let names: Vec<String> = gw
        .functions
        .list()
        .into_iter()
        .filter(|f| f.record.tenant == tenant)
        .map(|f| f.record.name)
        .collect();
    let deleted =
        futures::future::join_all(names.iter().map(|n| gw.functions.delete(tenant, n))).await;
    let functions_deleted: Vec<String> = names
        .into_iter()
        .zip(deleted)
        .filter_map(|(n, d)| match d {
            Ok(true) => Some(n),
            Ok(false) => None,
            Err(e) => {
                tracing::error!(tenant, function = %n, error = %e, "cannot delete the tenant's function");
                None
            }
        })
        .collect();
    // Nothing of it stays readable: its functions' logs and its pool's.
    for n in &functions_deleted {
        gw.node.logs().forget(tenant, n);
    }
    gw.node.logs().forget(tenant, "(pool)");
    let repositories_kept = gw
        .auth
        .repositories()
        .values()
        .filter(|o| *o == tenant)
        .count();
    tracing::info!(tenant, tokens_revoked, pool_removed, functions = ?functions_deleted, repositories_kept, "tenant deleted");
    Ok(TenantDeleted {
        tenant: tenant.to_string(),
        tokens_revoked,
        pool_removed,
        functions_deleted,
        repositories_kept,
    })
}
