//! The API contract: `crates/veil-gateway/openapi.json` checked against the real server. Every
//! route the gateway's router declares is documented and every documented operation exists;
//! methods a path does not document answer 405; every answer the scenario below gets — good
//! and bad requests, as the operator, a tenant, and no one — has a documented status, and its
//! JSON body validates against the documented schema (JSON Schema 2020-12, with the
//! `jsonschema` crate). Needs root (`make test`), like the other end-to-end tests.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

struct Contract {
    doc: Value,
    /// (path template, method) of every operation the scenario called.
    called: Mutex<BTreeSet<(String, String)>>,
    http: reqwest::Client,
    base: String,
}

struct Answer {
    status: u16,
    body: Value,
}

impl Contract {
    fn new(base: String) -> Self {
        Self {
            doc: serde_json::from_str(veil_gateway::OPENAPI).unwrap(),
            called: Mutex::default(),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            base,
        }
    }

    /// Follow a local `$ref`.
    fn deref<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => self.doc.pointer(r.trim_start_matches('#')).unwrap(),
            None => v,
        }
    }

    /// Check one answer against the document: its status is documented for the operation,
    /// and a JSON body validates against that status's schema.
    fn check(&self, template: &str, method: &str, status: u16, body: &[u8]) -> Value {
        let op = self.doc["paths"][template][method].clone();
        assert!(op.is_object(), "{method} {template} is not documented");
        let Some(resp) = op["responses"].get(status.to_string()) else {
            panic!(
                "{method} {template} answered {status}, which is not documented: {}",
                String::from_utf8_lossy(body)
            )
        };
        let resp = self.deref(resp);
        let Some(schema) = resp.pointer("/content/application~1json/schema") else {
            return Value::Null;
        };
        let instance: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "{method} {template} {status}: documented as JSON, got {e}: {}",
                String::from_utf8_lossy(body)
            )
        });
        // The schema with the document's components beside it, so its `$ref`s resolve.
        let mut root = schema.clone();
        root["components"] = self.doc["components"].clone();
        let validator = jsonschema::draft202012::new(&root).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {status}: the body does not match the document:\n{}\n{instance:#}",
            errors.join("\n")
        );
        instance
    }

    /// Send `method path` (an instance of `template`) with `token` and `body`, check the
    /// answer, and return it.
    async fn call(
        &self,
        method: &str,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        self.called
            .lock()
            .unwrap()
            .insert((template.to_string(), method.to_string()));
        let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let mut rb = self.http.request(m, format!("{}{path}", self.base));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap();
        let body = self.check(template, method, status, &bytes);
        Answer { status, body }
    }
}

/// Every `.route("<path>", …)` in the gateway's router source.
fn routes_in_source() -> BTreeSet<String> {
    let src = include_str!("../../veil-gateway/src/lib.rs");
    src.match_indices(".route(")
        .filter_map(|(i, m)| {
            let rest = src[i + m.len()..].trim_start().strip_prefix('"')?;
            Some(rest[..rest.find('"').unwrap()].to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_keeps_the_openapi_contract() {
    let env = up_with(|_| {}).await;
    let c = Contract::new(env.platform.url());
    let op_token = env.platform.operator_token().to_string();
    let op = Some(op_token.as_str());

    // The document is the one served, and names exactly the router's routes.
    let served = c
        .call(
            "get",
            "/v1/openapi.json",
            "/v1/openapi.json",
            None,
            None,
            &[],
        )
        .await;
    assert_eq!(served.body, c.doc);
    let documented: BTreeSet<String> = c.doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut in_source = routes_in_source();
    // The registry's wildcard is documented by its base; the invocation wildcard by name.
    assert!(in_source.remove("/v2/{*rest}"));
    assert!(in_source.remove("/f/{name}/{*rest}"));
    in_source.insert("/f/{name}/{path}".into());
    assert_eq!(in_source, documented, "router and openapi.json disagree");

    // Tokens.
    let a = c
        .call(
            "post",
            "/v1/tokens",
            "/v1/tokens",
            op,
            Some(json!({"tenant": "a"})),
            &[],
        )
        .await;
    assert_eq!(a.status, 201);
    let a_token = a.body["token"].as_str().unwrap().to_string();
    let a_id = a.body["id"].as_str().unwrap().to_string();
    let tenant = Some(a_token.as_str());
    for bad in [
        json!({"tenant": "a", "admin": true}),
        json!({"tenant": "A B"}),
        json!([]),
    ] {
        let r = c
            .call("post", "/v1/tokens", "/v1/tokens", op, Some(bad), &[])
            .await;
        assert_eq!(r.status, 400);
    }
    let r = c
        .call(
            "post",
            "/v1/tokens",
            "/v1/tokens",
            tenant,
            Some(json!({"tenant": "a"})),
            &[],
        )
        .await;
    assert_eq!(r.status, 403);
    let r = c
        .call("get", "/v1/tokens", "/v1/tokens", None, None, &[])
        .await;
    assert_eq!(r.status, 401);
    let r = c
        .call("get", "/v1/tokens", "/v1/tokens", op, None, &[])
        .await;
    assert_eq!(r.status, 200);

    // Functions.
    let image = push_hello(&env, "contract:v1").await;
    let fp = "/v1/functions/{name}";
    let deploy = json!({"image": image, "env": {"K": "v"}, "concurrency": 4, "target": 2.5,
                        "max_scale": 3, "idle_timeout_s": 120, "keep_alive": "fixed"});
    let r = c
        .call(
            "put",
            fp,
            "/v1/functions/hello",
            op,
            Some(deploy.clone()),
            &[],
        )
        .await;
    assert_eq!(r.status, 201);
    let r = c
        .call(
            "put",
            fp,
            "/v1/functions/hello",
            op,
            Some(deploy.clone()),
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["revision"], 2);
    for bad in [
        json!({"image": image, "replicas": 3}),
        json!({"image": image, "min_scale": 5, "max_scale": 2}),
        json!({"image": image, "concurrency": 4, "target": 50}),
        json!({"image": image, "concurrency": "many"}),
        json!({}),
    ] {
        let r = c
            .call("put", fp, "/v1/functions/hello", op, Some(bad.clone()), &[])
            .await;
        assert_eq!(r.status, 400, "{bad}");
    }
    let r = c
        .call(
            "put",
            fp,
            "/v1/functions/Bad_Name",
            op,
            Some(deploy.clone()),
            &[],
        )
        .await;
    assert_eq!(r.status, 400);
    let r = c
        .call(
            "put",
            fp,
            "/v1/functions/hello",
            tenant,
            Some(deploy.clone()),
            &[],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = c
        .call(
            "put",
            fp,
            "/v1/functions/other",
            op,
            Some(json!({"image": "local/nothing-here:v1"})),
            &[],
        )
        .await;
    assert_eq!(r.status, 404);
    let r = c
        .call("get", "/v1/functions", "/v1/functions", op, None, &[])
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    let r = c
        .call("get", "/v1/functions", "/v1/functions", tenant, None, &[])
        .await;
    assert!(r.body.as_array().unwrap().is_empty());
    assert_eq!(
        c.call("get", fp, "/v1/functions/hello", tenant, None, &[])
            .await
            .status,
        404
    );
    assert_eq!(
        c.call("get", fp, "/v1/functions/nope", op, None, &[])
            .await
            .status,
        404
    );

    // Invocations, synchronous (every method) and asynchronous.
    for m in METHODS {
        for (template, path) in [
            ("/f/{name}", "/f/hello"),
            ("/f/{name}/", "/f/hello/"),
            ("/f/{name}/{path}", "/f/hello/some/where"),
        ] {
            let r = c.call(m, template, path, None, None, &[]).await;
            assert_eq!(r.status, 200, "{m} {path}");
        }
    }
    assert_eq!(
        c.call("get", "/f/{name}/{path}", "/f/nope/x", None, None, &[])
            .await
            .status,
        404
    );
    let prefer = [("prefer", "respond-async")];
    let r = c
        .call(
            "post",
            "/f/{name}/{path}",
            "/f/hello/later",
            None,
            None,
            &prefer,
        )
        .await;
    assert_eq!(r.status, 202);
    let id = r.body["id"].as_str().unwrap().to_string();
    let ip = "/v1/invocations/{id}";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .call("get", ip, &format!("/v1/invocations/{id}"), op, None, &[])
            .await;
        assert_eq!(r.status, 200);
        if r.body["state"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "{}", r.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (who, path) in [
        (tenant, format!("/v1/invocations/{id}")),
        (op, "/v1/invocations/nope".to_string()),
    ] {
        assert_eq!(c.call("get", ip, &path, who, None, &[]).await.status, 404);
    }

    // Logs.
    let lp = "/v1/functions/{name}/logs";
    let r = c
        .call("get", lp, "/v1/functions/hello/logs?tail=5", op, None, &[])
        .await;
    let seq = r.body.as_array().unwrap().last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    let r = c
        .call(
            "get",
            lp,
            &format!("/v1/functions/hello/logs?after={seq}&wait=0"),
            op,
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    for bad in ["?tail=lots", "?follow=1", "?after=-1"] {
        let r = c
            .call(
                "get",
                lp,
                &format!("/v1/functions/hello/logs{bad}"),
                op,
                None,
                &[],
            )
            .await;
        assert_eq!(r.status, 400, "{bad}");
    }

    // Traffic.
    let tp = "/v1/functions/{name}/traffic";
    let r = c
        .call(
            "put",
            tp,
            "/v1/functions/hello/traffic",
            op,
            Some(json!({"traffic": [{"revision": 1, "percent": 50}, {"percent": 50, "tag": "next"}]})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200);
    for bad in [
        json!({"traffic": [{"percent": 90}]}),
        json!({"traffic": [{"revision": 9, "percent": 100}]}),
        json!({"traffic": [{"percent": 100, "weight": 1}]}),
        json!({"split": []}),
    ] {
        let r = c
            .call(
                "put",
                tp,
                "/v1/functions/hello/traffic",
                op,
                Some(bad.clone()),
                &[],
            )
            .await;
        assert_eq!(r.status, 400, "{bad}");
    }

    // The node, pools, tenants: the operator's; a tenant gets 403.
    for (template, path) in [
        ("/v1/sandboxes", "/v1/sandboxes"),
        ("/v1/node", "/v1/node"),
        ("/v1/tenant-pools", "/v1/tenant-pools"),
        ("/v1/tenants", "/v1/tenants"),
    ] {
        assert_eq!(
            c.call("get", template, path, op, None, &[]).await.status,
            200
        );
        assert_eq!(
            c.call("get", template, path, tenant, None, &[])
                .await
                .status,
            403
        );
    }
    let pp = "/v1/tenant-pools/{tenant}";
    let r = c
        .call(
            "put",
            pp,
            "/v1/tenant-pools/a",
            op,
            Some(json!({"size": 0, "allow_insecure_software_tee": true})),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for bad in [json!({"size": 1, "extra": 1}), json!({"size": -1})] {
        let r = c
            .call("put", pp, "/v1/tenant-pools/a", op, Some(bad.clone()), &[])
            .await;
        assert_eq!(r.status, 400, "{bad}");
    }
    assert_eq!(
        c.call("delete", pp, "/v1/tenant-pools/a", op, None, &[])
            .await
            .status,
        204
    );
    let tp = "/v1/tenants/{tenant}";
    assert_eq!(
        c.call("delete", tp, "/v1/tenants/nobody", op, None, &[])
            .await
            .status,
        404
    );
    let kp = "/v1/tokens/{id}";
    assert_eq!(
        c.call("delete", kp, &format!("/v1/tokens/{a_id}"), op, None, &[])
            .await
            .status,
        200
    );
    assert_eq!(
        c.call("delete", kp, &format!("/v1/tokens/{a_id}"), op, None, &[])
            .await
            .status,
        404
    );
    let b = c
        .call(
            "post",
            "/v1/tokens",
            "/v1/tokens",
            op,
            Some(json!({"tenant": "b"})),
            &[],
        )
        .await;
    assert_eq!(b.status, 201);
    let r = c.call("delete", tp, "/v1/tenants/b", op, None, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["tokens_revoked"], 1);

    // Health, metrics, the store.
    assert_eq!(
        c.call("get", "/healthz", "/healthz", None, None, &[])
            .await
            .status,
        200
    );
    assert_eq!(
        c.call("get", "/metrics", "/metrics", None, None, &[])
            .await
            .status,
        200
    );
    assert_eq!(
        c.call("get", "/v2/", "/v2/", op, None, &[]).await.status,
        200
    );
    assert_eq!(
        c.call("get", "/v2/", "/v2/", None, None, &[]).await.status,
        401
    );

    // Delete last.
    let r = c
        .call("delete", fp, "/v1/functions/hello", op, None, &[])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        c.call("delete", fp, "/v1/functions/hello", op, None, &[])
            .await
            .status,
        404
    );

    // Every documented operation was called, and every other method on an admin path is 405.
    let called = c.called.lock().unwrap().clone();
    for (path, item) in c.doc["paths"].as_object().unwrap() {
        for m in METHODS {
            if item.get(m).is_some() {
                assert!(
                    called.contains(&(path.clone(), m.to_string())),
                    "{m} {path} is documented but the scenario never called it"
                );
            } else if path.starts_with("/v1/") {
                let concrete = path
                    .replace("{name}", "hello")
                    .replace("{id}", &"0".repeat(32))
                    .replace("{tenant}", "a");
                let r = c
                    .http
                    .request(
                        reqwest::Method::from_bytes(m.to_uppercase().as_bytes()).unwrap(),
                        format!("{}{concrete}", c.base),
                    )
                    .bearer_auth(&op_token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 405, "{m} {path} is not documented but answers");
            }
        }
    }
    stop_clean(env).await;
}
