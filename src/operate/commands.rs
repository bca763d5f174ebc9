//! The operator commands behind `courier topology`, `courier dlq` and
//! `courier outbox status`: each loads what it needs from the settings,
//! does its work and prints, for people or (`--json`) for scripts. Each
//! returns whether the command succeeded, which the binary turns into its
//! exit code.

use std::io::{BufRead, Write};

use super::{
    dlq::{Dlq, Selection},
    queues, render,
};
use crate::{
    amqp::{Topology, drift, management::Management, provision},
    config::Settings,
    store,
};

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `courier topology apply`: declares, migrates what it safely can, applies
/// the policies. Succeeds even when a queue with messages was left as it is
/// (reported, and `topology check` keeps naming it).
pub async fn topology_apply(settings: &Settings, json: bool) -> anyhow::Result<bool> {
    let topology = Topology::from_settings(&settings.topology);
    let report = provision::declare_topology(&settings.amqp, &topology).await?;
    if json {
        print_json(&report)?;
    } else {
        print!("{}", render::apply_report(&report));
        println!(
            "topology declared and {} policies applied on {}",
            topology.plan().policies.len(),
            settings.amqp.display_addr_as(&settings.amqp.operator)
        );
    }
    Ok(true)
}

/// `courier topology show`: what `apply` declares, from the configuration
/// alone (no broker needed). `definitions` prints the policies as the
/// `policies` array of a RabbitMQ definitions file
/// (config/rabbitmq-definitions.json).
pub fn topology_show(settings: &Settings, json: bool, definitions: bool) -> anyhow::Result<bool> {
    let plan = Topology::from_settings(&settings.topology).plan();
    if definitions {
        let policies: Vec<serde_json::Value> = plan
            .policies
            .iter()
            .map(|p| {
                serde_json::json!({
                    "vhost": settings.amqp.vhost,
                    "name": p.name,
                    "pattern": p.pattern,
                    "apply-to": p.apply_to,
                    "priority": p.priority,
                    "definition": p.definition,
                })
            })
            .collect();
        print_json(&serde_json::json!({ "policies": policies }))?;
    } else if json {
        print_json(&plan)?;
    } else {
        print!("{}", render::plan(&plan));
    }
    Ok(true)
}

/// `courier topology check`: false when the broker differs from the plan.
pub async fn topology_check(settings: &Settings, json: bool) -> anyhow::Result<bool> {
    let plan = Topology::from_settings(&settings.topology).plan();
    let live = Management::as_operator(&settings.amqp)?
        .live_topology(&settings.amqp.vhost)
        .await?;
    let drifts = drift::compare(&plan, &live);
    if json {
        print_json(&serde_json::json!({
            "vhost": settings.amqp.vhost,
            "in_sync": drifts.is_empty(),
            "drift": drifts,
        }))?;
    } else {
        println!(
            "{}",
            render::drifts(&settings.amqp.vhost, &drifts).trim_end()
        );
    }
    Ok(drifts.is_empty())
}

async fn dlq(settings: &Settings) -> anyhow::Result<Dlq> {
    let db = store::pool(&settings.database)?;
    Dlq::connect(
        &settings.amqp,
        Topology::from_settings(&settings.topology),
        db,
    )
    .await
}

/// `courier dlq list [QUEUE]`.
pub async fn dlq_list(
    settings: &Settings,
    queue: Option<&str>,
    json: bool,
) -> anyhow::Result<bool> {
    let dlq = dlq(settings).await?;
    let mut letters = Vec::new();
    for worker in dlq.workers(queue)? {
        letters.extend(dlq.list(&worker).await?);
    }
    dlq.close().await;
    if json {
        print_json(&letters)?;
    } else {
        println!("{}", render::dead_letters(&letters));
    }
    Ok(true)
}

/// `courier dlq show EVENT_ID`: false when no dead-letter queue holds it.
pub async fn dlq_show(settings: &Settings, event_id: &str, json: bool) -> anyhow::Result<bool> {
    let dlq = dlq(settings).await?;
    let found = dlq.show(event_id).await?;
    dlq.close().await;
    let Some(detail) = found else {
        eprintln!("courier: no dead letter with event id {event_id}");
        return Ok(false);
    };
    if json {
        print_json(&detail)?;
    } else {
        let v = &detail.view;
        println!("event {event_id} in {}", v.queue);
        println!("  type         {}", v.event_type.as_deref().unwrap_or("-"));
        println!("  order        {}", v.order_id.as_deref().unwrap_or("-"));
        println!("  error kind   {}", v.error_kind);
        println!(
            "  attempts     {}",
            v.attempts.map_or_else(|| "-".to_owned(), |a| a.to_string())
        );
        println!(
            "  first failed {}",
            v.first_failed_at.as_deref().unwrap_or("-")
        );
        println!("  last error   {}", v.last_error.as_deref().unwrap_or("-"));
        println!(
            "properties\n{}",
            serde_json::to_string_pretty(&detail.properties)?
        );
        println!(
            "headers\n{}",
            serde_json::to_string_pretty(&detail.headers)?
        );
        println!("body\n{}", serde_json::to_string_pretty(&detail.body)?);
    }
    Ok(true)
}

/// `courier dlq replay QUEUE ...`.
pub async fn dlq_replay(
    settings: &Settings,
    queue: &str,
    selection: &Selection,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<bool> {
    let dlq = dlq(settings).await?;
    let worker = dlq.worker(queue)?.clone();
    let outcomes = dlq.replay(&worker, selection, dry_run).await;
    dlq.close().await;
    let outcomes = outcomes?;
    print_outcomes(&outcomes, json)?;
    if !json {
        if dry_run {
            println!("dry run: nothing was replayed");
        } else if !outcomes.is_empty() {
            println!(
                "replayed into `{}` with their message ids and a fresh attempt count; audited in dead_letter_actions",
                worker.work()
            );
        }
    }
    Ok(true)
}

/// `courier dlq purge QUEUE ...`: asks on the terminal unless `yes`; false
/// when the operator declined.
pub async fn dlq_purge(
    settings: &Settings,
    queue: &str,
    selection: &Selection,
    yes: bool,
    json: bool,
) -> anyhow::Result<bool> {
    let dlq = dlq(settings).await?;
    let worker = dlq.worker(queue)?.clone();
    let dead = worker.dead();
    let confirm = |doomed: usize| yes || ask(&dead, doomed);
    let outcomes = dlq.purge(&worker, selection, confirm).await;
    dlq.close().await;
    let Some(outcomes) = outcomes? else {
        eprintln!("courier: nothing purged");
        return Ok(false);
    };
    print_outcomes(&outcomes, json)?;
    Ok(true)
}

/// Asks on the terminal; true only for `yes`.
fn ask(queue: &str, doomed: usize) -> bool {
    eprint!(
        "purge {doomed} dead letter(s) from `{queue}`? Each is kept, headers and body, in dead_letter_actions. Type `yes` to purge: "
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).is_ok() && answer.trim() == "yes"
}

fn print_outcomes(outcomes: &[super::dlq::Outcome], json: bool) -> anyhow::Result<()> {
    if json {
        print_json(&outcomes)
    } else {
        println!("{}", render::outcomes(outcomes));
        Ok(())
    }
}

/// `courier outbox status`.
pub async fn outbox_status(settings: &Settings, errors: i64, json: bool) -> anyhow::Result<bool> {
    let mut conn = store::connect(&settings.database.url()).await?;
    let status = store::outbox::status(&mut conn, errors).await?;
    if json {
        print_json(&status)?;
    } else {
        print!("{}", render::outbox(&status, chrono::Utc::now()));
    }
    Ok(true)
}

/// The lines `courier check` adds about where messages are right now.
pub async fn pipeline_lines(settings: &Settings) -> anyhow::Result<String> {
    let topology = Topology::from_settings(&settings.topology);
    let counts = queues::worker_counts(&settings.amqp, &topology).await?;
    let mut conn = store::connect(&settings.database.url()).await?;
    let pending = store::outbox::pending_count(&mut conn).await?;
    let mut out = String::new();
    for c in &counts {
        let tiers: Vec<String> = c.retrying.iter().map(|(q, n)| format!("{q} {n}")).collect();
        out.push_str(&format!(
            "{:<32}{:>8}  ({})\n",
            format!("{} waiting in delay tiers", c.worker),
            c.retrying_total(),
            tiers.join(", ")
        ));
        out.push_str(&format!(
            "{:<32}{:>8}\n",
            format!("{} in {}.dead", c.worker, c.worker),
            c.dead
        ));
    }
    out.push_str(&format!(
        "{:<32}{:>8}\n",
        "events pending (all types)", pending
    ));
    Ok(out)
}
