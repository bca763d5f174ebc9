//! How the operator CLI prints its answers for people: aligned tables and
//! short lines. `--json` prints the same values with serde instead.

use comfy_table::{ContentArrangement, Table, presets::NOTHING};

use super::dlq::{DeadLetterView, Outcome};
use crate::{
    amqp::{drift::Drift, plan::TopologyPlan, provision::ApplyReport},
    store::outbox::OutboxStatus,
};

/// A borderless table with a header row. Cells never wrap (ids stay whole
/// and greppable); long texts are cut to one line by [`cut`] instead.
fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_style(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    table
}

/// The table's text, without the padding after each line's last cell.
fn text(table: &Table) -> String {
    table
        .to_string()
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One line of at most `max` characters.
fn cut(text: &str, max: usize) -> String {
    let line = text.replace(['\n', '\r'], " ");
    if line.chars().count() <= max {
        return line;
    }
    let mut out: String = line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_owned()
}

pub fn dead_letters(letters: &[DeadLetterView]) -> String {
    if letters.is_empty() {
        return "no dead letters".to_owned();
    }
    let mut t = table(&[
        "QUEUE",
        "EVENT ID",
        "TYPE",
        "ORDER",
        "KIND",
        "ATTEMPTS",
        "FIRST FAILED",
        "LAST ERROR",
    ]);
    for l in letters {
        t.add_row(vec![
            l.queue.clone(),
            or_dash(l.event_id.as_deref()),
            or_dash(l.event_type.as_deref()),
            or_dash(l.order_id.as_deref()),
            l.error_kind.clone(),
            l.attempts.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            or_dash(
                l.first_failed_at
                    .as_deref()
                    .map(|t| t.get(..19).unwrap_or(t)),
            ),
            cut(l.last_error.as_deref().unwrap_or("-"), 110),
        ]);
    }
    format!("{}\n{} dead letter(s)", text(&t), letters.len())
}

pub fn outcomes(outcomes: &[Outcome]) -> String {
    if outcomes.is_empty() {
        return "no dead letter matched".to_owned();
    }
    let mut t = table(&["EVENT ID", "ORDER", "KIND", "DONE", "NOTE", "AUDIT"]);
    for o in outcomes {
        t.add_row(vec![
            or_dash(o.letter.event_id.as_deref()),
            or_dash(o.letter.order_id.as_deref()),
            o.letter.error_kind.clone(),
            o.done.clone(),
            or_dash(o.note.as_deref()),
            o.audit_id
                .map_or_else(|| "-".to_owned(), |id| format!("#{id}")),
        ]);
    }
    format!("{}\n{} message(s)", text(&t), outcomes.len())
}

pub fn outbox(status: &OutboxStatus, now: chrono::DateTime<chrono::Utc>) -> String {
    let age = status.oldest_pending_at.map_or_else(
        || "-".to_owned(),
        |at| {
            let secs = u64::try_from((now - at).num_seconds().max(0)).unwrap_or(0);
            humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
        },
    );
    let mut out = format!(
        "pending                {:>8}\n\
         of them failing        {:>8}\n\
         oldest pending age     {:>8}\n\
         published (kept)       {:>8}\n",
        status.pending, status.failing, age, status.published
    );
    if !status.last_errors.is_empty() {
        let mut t = table(&[
            "EVENT ID",
            "TYPE",
            "AGGREGATE",
            "ATTEMPTS",
            "NEXT TRY",
            "LAST ERROR",
        ]);
        for e in &status.last_errors {
            t.add_row(vec![
                e.event_id.to_string(),
                e.event_type.clone(),
                e.aggregate_id.clone(),
                e.attempts.to_string(),
                e.next_attempt_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                cut(e.last_error.as_deref().unwrap_or("-"), 70),
            ]);
        }
        out.push_str(&format!("last errors:\n{}\n", text(&t)));
    }
    out
}

pub fn drifts(vhost: &str, drifts: &[Drift]) -> String {
    if drifts.is_empty() {
        return format!("vhost `{vhost}`: the broker matches the topology");
    }
    let mut out = format!("vhost `{vhost}`: {} difference(s)\n", drifts.len());
    for drift in drifts {
        out.push_str(&format!("  {drift}\n"));
    }
    out
}

pub fn apply_report(report: &ApplyReport) -> String {
    let mut out = String::new();
    for queue in &report.migrated {
        out.push_str(&format!(
            "migrated: queue `{queue}` was empty and declared with legacy arguments; declared again with its settings in policy `courier.{queue}`\n"
        ));
    }
    for left in &report.left {
        out.push_str(&format!("left: {left}\n"));
    }
    out
}

pub fn plan(plan: &TopologyPlan) -> String {
    let mut t = table(&["QUEUE", "WHAT IT IS FOR", "POLICY", "SETTINGS"]);
    for queue in &plan.queues {
        let policy = plan.policy_for(&queue.name);
        let settings: Vec<String> = policy
            .map(|p| {
                p.definition
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect()
            })
            .unwrap_or_default();
        t.add_row(vec![
            queue.name.clone(),
            queue.purpose.clone(),
            policy.map_or_else(|| "-".to_owned(), |p| p.name.clone()),
            settings.join(" "),
        ]);
    }
    let mut out = format!("{}\n", text(&t));
    out.push_str("bindings:\n");
    for b in &plan.bindings {
        out.push_str(&format!(
            "  {} -> {} ({})\n",
            b.exchange, b.queue, b.routing_key
        ));
    }
    out
}
