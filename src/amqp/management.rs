//! The calls of RabbitMQ's management HTTP API that courier needs: vhosts,
//! users and their permissions (provisioning), policies (AMQP cannot set
//! them), and reading what the broker holds for `courier topology check`.

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::{
    permissions::Permissions,
    plan::{Arguments, PolicySpec},
};
use crate::config::{AmqpSettings, BrokerUser, percent_encode};

/// A management API client. Provisioning needs an administrator's login;
/// policies and reads need the operator's (tags `management,policymaker`).
pub struct Management {
    http: reqwest::Client,
    base_url: String,
    user: String,
    password: SecretString,
}

impl Management {
    pub fn new(base_url: &str, user: &str, password: SecretString) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("cannot build the management API client")?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            user: user.to_owned(),
            password,
        })
    }

    /// Logged in as the operator user of `amqp`.
    pub fn as_operator(amqp: &AmqpSettings) -> anyhow::Result<Self> {
        Self::new(
            &amqp.management_url,
            &amqp.operator.user,
            amqp.operator.password.clone(),
        )
    }

    pub async fn ensure_vhost(&self, vhost: &str) -> anyhow::Result<()> {
        self.put(&format!("/vhosts/{}", percent_encode(vhost)), json!({}))
            .await
    }

    /// Creates the user or sets its password and tags.
    pub async fn put_user(&self, user: &BrokerUser, tags: &str) -> anyhow::Result<()> {
        self.put(
            &format!("/users/{}", percent_encode(&user.user)),
            json!({ "password": user.password.expose_secret(), "tags": tags }),
        )
        .await
    }

    pub async fn delete_user(&self, name: &str) -> anyhow::Result<()> {
        self.delete(&format!("/users/{}", percent_encode(name)))
            .await
    }

    /// `method` `/api{path}` as this login; the URL for messages.
    fn request(&self, method: reqwest::Method, path: &str) -> (String, reqwest::RequestBuilder) {
        let url = format!("{}/api{path}", self.base_url);
        let request = self
            .http
            .request(method, &url)
            .basic_auth(&self.user, Some(self.password.expose_secret()));
        (url, request)
    }

    /// DELETE `/api{path}`; a 404 (already gone) is fine.
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let (url, request) = self.request(reqwest::Method::DELETE, path);
        let response = request
            .send()
            .await
            .with_context(|| format!("DELETE {url}"))?;
        if response.status().is_success() || response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        anyhow::bail!("DELETE {url}: {}", response.status())
    }

    pub async fn set_permissions(
        &self,
        vhost: &str,
        user: &str,
        grant: &Permissions,
    ) -> anyhow::Result<()> {
        self.put(
            &format!(
                "/permissions/{}/{}",
                percent_encode(vhost),
                percent_encode(user)
            ),
            json!({ "configure": grant.configure, "write": grant.write, "read": grant.read }),
        )
        .await
    }

    /// Creates or replaces the policy `spec` in `vhost`.
    pub async fn put_policy(&self, vhost: &str, spec: &PolicySpec) -> anyhow::Result<()> {
        self.put(
            &format!(
                "/policies/{}/{}",
                percent_encode(vhost),
                percent_encode(&spec.name)
            ),
            json!({
                "pattern": spec.pattern,
                "apply-to": spec.apply_to,
                "priority": spec.priority,
                "definition": spec.definition,
            }),
        )
        .await
    }

    /// What the broker holds in `vhost`, for comparing with the plan.
    pub async fn live_topology(&self, vhost: &str) -> anyhow::Result<LiveTopology> {
        let vhost = percent_encode(vhost);
        Ok(LiveTopology {
            exchanges: self.get(&format!("/exchanges/{vhost}")).await?,
            queues: self.get(&format!("/queues/{vhost}")).await?,
            bindings: self.get(&format!("/bindings/{vhost}")).await?,
            policies: self.get(&format!("/policies/{vhost}")).await?,
        })
    }

    /// GET `/api{path}` as JSON.
    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let (url, request) = self.request(reqwest::Method::GET, path);
        let response = request
            .send()
            .await
            .with_context(|| format!("GET {url}: is the management plugin enabled?"))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            anyhow::bail!("GET {url} as `{}`: {status} {text}", self.user);
        }
        response
            .json()
            .await
            .with_context(|| format!("GET {url}: unexpected answer"))
    }

    /// PUT `/api{path}` with a JSON body.
    pub async fn put(&self, path: &str, body: serde_json::Value) -> anyhow::Result<()> {
        let (url, request) = self.request(reqwest::Method::PUT, path);
        let response = request
            .json(&body)
            .send()
            .await
            .with_context(|| format!("PUT {url}: is the management plugin enabled?"))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        anyhow::bail!(
            "PUT {url} as `{}`: {status} {text} (is the login an administrator, or a policymaker for policies?)",
            self.user
        )
    }
}

/// An exchange as the management API lists it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct LiveExchange {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub durable: bool,
    #[serde(default)]
    pub arguments: Arguments,
}

/// A queue as the management API lists it. `messages` comes from the
/// statistics database and lags by a few seconds; exact counts need AMQP.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct LiveQueue {
    pub name: String,
    pub durable: bool,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub arguments: Arguments,
    #[serde(default)]
    pub messages: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct LiveBinding {
    pub source: String,
    pub destination: String,
    pub destination_type: String,
    pub routing_key: String,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct LivePolicy {
    pub name: String,
    pub pattern: String,
    #[serde(rename = "apply-to")]
    pub apply_to: String,
    pub priority: i64,
    #[serde(default)]
    pub definition: Arguments,
}

/// Everything `courier topology check` compares in one vhost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveTopology {
    pub exchanges: Vec<LiveExchange>,
    pub queues: Vec<LiveQueue>,
    pub bindings: Vec<LiveBinding>,
    pub policies: Vec<LivePolicy>,
}
