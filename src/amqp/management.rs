//! The few calls of RabbitMQ's management HTTP API that provisioning needs:
//! vhosts, users and their permissions. AMQP cannot create users.

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::permissions::Permissions;
use crate::config::{BrokerUser, percent_encode};

/// A management API client logged in as an administrator.
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
        let url = format!("{}/api/users/{}", self.base_url, percent_encode(name));
        let response = self
            .http
            .delete(&url)
            .basic_auth(&self.user, Some(self.password.expose_secret()))
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

    async fn put(&self, path: &str, body: serde_json::Value) -> anyhow::Result<()> {
        let url = format!("{}/api{path}", self.base_url);
        let response = self
            .http
            .put(&url)
            .basic_auth(&self.user, Some(self.password.expose_secret()))
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
            "PUT {url} as `{}`: {status} {text} (an administrator's login is needed)",
            self.user
        )
    }
}
