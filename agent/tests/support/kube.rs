//! A stand-in for the Kubernetes API server (none runs on this machine): it answers every
//! request plausibly and remembers it, so tests check exactly what kube-rs sent.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub content_type: String,
    pub body: Value,
}

/// An API server that answers every request plausibly and remembers it.
pub async fn mock_api() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let bytes = body.collect().await.unwrap().to_bytes();
                        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                        let content_type = parts
                            .headers
                            .get("content-type")
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default();
                        log.lock().unwrap().push(Seen {
                            method: parts.method.to_string(),
                            path: parts.uri.path().to_string(),
                            content_type,
                            body: body.clone(),
                        });
                        // Echo the object back, named, as the API server would.
                        let mut answer = if body.is_object() { body } else { json!({}) };
                        let kind = if parts.uri.path().contains("/events") {
                            "Event"
                        } else if parts.uri.path().contains("/nodes/") {
                            "Node"
                        } else {
                            "Pod"
                        };
                        answer["apiVersion"] = json!("v1");
                        answer["kind"] = json!(kind);
                        answer["metadata"]["name"] = json!("answered");
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(if parts.method == "POST" { 201 } else { 200 })
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(answer.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, seen)
}
