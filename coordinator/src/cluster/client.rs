//! The CLI's side of the coordinator's REST API: JSON over HTTP, the secret as a bearer token,
//! and errors that name the coordinator's address or repeat the coordinator's own message.

use serde::de::DeserializeOwned;
use std::time::Duration;

/// A connection to one coordinator.
pub struct Client {
    addr: String,
    base: String,
    secret: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of the coordinator at `addr` (`host:port`, or an `http://` URL).
    pub fn new(addr: &str, secret: Option<String>) -> Result<Self, String> {
        if addr.starts_with("https://") {
            // Built without TLS: the coordinator serves plain HTTP.
            return Err(format!(
                "cannot reach the coordinator at {addr}: https is not supported, use http://"
            ));
        }
        let base = if addr.starts_with("http://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{addr}")
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Self {
            addr: addr.to_string(),
            base,
            secret,
            http,
        })
    }

    /// The coordinator's `host:port`: the address given, without `http://`.
    pub fn host(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<serde_json::Value, String> {
        let request = match &self.secret {
            Some(s) => request.bearer_auth(s),
            None => request,
        };
        let response = request.send().await.map_err(|e| {
            let mut cause = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                cause = format!("{cause}: {s}");
                source = s.source();
            }
            format!("cannot reach the coordinator at {}: {cause}", self.addr)
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("reading the answer of the coordinator at {} failed: {e}", self.addr))?;
        let value: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| serde_json::json!({ "error": String::from_utf8_lossy(&body).trim().to_string() }));
        if status.is_success() {
            return Ok(value);
        }
        let message = value
            .get("error")
            .and_then(|e| e.as_str())
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| format!("the coordinator at {} answered {status}", self.addr));
        Err(message)
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<serde_json::Value, String> {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    /// `GET path`, decoded.
    pub async fn get_typed<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let value = self.get(path).await?;
        serde_json::from_value(value).map_err(|e| format!("unexpected answer from {}: {e}", self.addr))
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &impl serde::Serialize) -> Result<serde_json::Value, String> {
        let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(bytes);
        self.send(request).await
    }
}
