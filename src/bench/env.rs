//! The bench's own place on the shared services: a RabbitMQ vhost and a
//! PostgreSQL database of its own, created at the start (migrated) and
//! dropped at the end, never the `courier` ones.

use std::time::Duration;

use diesel_async::RunQueryDsl;
use uuid::Uuid;

use crate::{config::Settings, store};

/// The RabbitMQ management API: where vhosts are created and the broker's
/// node is found.
#[derive(Debug, Clone)]
pub struct Management {
    pub url: String,
    pub user: String,
    pub password: String,
}

impl Management {
    fn http() -> anyhow::Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?)
    }

    async fn put(&self, path: &str, body: serde_json::Value) -> anyhow::Result<()> {
        Self::http()?
            .put(format!("{}{path}", self.url))
            .basic_auth(&self.user, Some(&self.password))
            .json(&body)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    async fn delete(&self, path: &str) -> anyhow::Result<()> {
        Self::http()?
            .delete(format!("{}{path}", self.url))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        Ok(Self::http()?
            .get(format!("{}{path}", self.url))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// The broker's version and the OS pid of its (first) node.
    pub async fn broker(&self) -> anyhow::Result<(String, Option<i32>)> {
        let overview = self.get("/api/overview").await?;
        let version = overview["rabbitmq_version"]
            .as_str()
            .unwrap_or("unknown")
            .to_owned();
        let nodes = self.get("/api/nodes").await?;
        let pid = nodes[0]["os_pid"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .or_else(|| {
                nodes[0]["os_pid"]
                    .as_i64()
                    .and_then(|p| i32::try_from(p).ok())
            });
        Ok((version, pid))
    }
}

/// A vhost and a database named alike, for one pipeline of the bench.
pub struct BenchEnv {
    pub name: String,
    /// The base settings pointed at this vhost and database.
    pub settings: Settings,
    management: Management,
}

impl BenchEnv {
    /// Creates `courier_bench_<tag>_<random>` as vhost (with permissions for
    /// the configured broker user) and database, and migrates the database.
    pub async fn create(
        base: &Settings,
        management: &Management,
        tag: &str,
    ) -> anyhow::Result<Self> {
        let name = format!(
            "courier_bench_{tag}_{}",
            &Uuid::now_v7().simple().to_string()[24..]
        );
        let mut settings = base.clone();
        settings.database.name = name.clone();
        settings.amqp.vhost = name.clone();

        let mut admin = store::connect(&settings.database.url_for("postgres")).await?;
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .map_err(|e| anyhow::anyhow!("cannot create database {name}: {e}"))?;
        let env = Self {
            name: name.clone(),
            settings,
            management: management.clone(),
        };
        // From here on, `drop_all` cleans up whatever exists.
        let created = async {
            management
                .put(&format!("/api/vhosts/{name}"), serde_json::json!({}))
                .await
                .map_err(|e| anyhow::anyhow!("cannot create vhost {name} (management API): {e}"))?;
            // The pipeline runs as in production: each service as its own
            // least-privilege user, the topology declared by the operator.
            let admin = crate::amqp::management::Management::new(
                &management.url,
                &management.user,
                secrecy::SecretString::from(management.password.clone()),
            )?;
            crate::amqp::provision::provision(
                &admin,
                &env.settings.amqp,
                &crate::amqp::Topology::from_settings(&env.settings.topology),
            )
            .await?;
            store::run_migrations(&env.settings.database.url()).await?;
            anyhow::Ok(())
        };
        if let Err(error) = created.await {
            env.drop_all().await;
            return Err(error);
        }
        Ok(env)
    }

    /// The AMQP URI of this vhost as the operator (the broker-limit queue
    /// and the Celery peer declare their own objects), password included:
    /// never log it.
    pub fn amqp_uri(&self) -> String {
        self.settings.amqp.uri_as(&self.settings.amqp.operator)
    }

    /// Deletes the vhost and drops the database (closing its sessions).
    pub async fn drop_all(&self) {
        let _ = self
            .management
            .delete(&format!("/api/vhosts/{}", self.name))
            .await;
        if let Ok(mut admin) = store::connect(&self.settings.database.url_for("postgres")).await {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin)
            .await;
        }
    }

    /// The database URL in libpq form, for the Celery peer.
    pub fn database_url(&self) -> String {
        self.settings.database.url()
    }
}
