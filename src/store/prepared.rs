//! Raw SQL that a connection prepares once and from then on only executes.
//!
//! Diesel never caches a statement built by `diesel::sql_query` (nor any
//! `UPDATE` of its query builder): it marks them unsafe to cache, because
//! their text may change from one run to the next. With diesel-async an
//! uncached statement is prepared again on every run: a Parse/Describe
//! round trip before the Bind/Execute one, and a parse and analysis in
//! PostgreSQL each time. Every write on an order's path was such a
//! statement (BENCHMARKS.md).
//!
//! [`prepared_sql`] takes only `&'static str`, so its text cannot change and
//! the connection's statement cache, keyed by that text, stays as small as
//! the number of such statements in the program. The statements bind
//! arrays, never a list that grows with the batch, for the same reason.
//! Pooled sessions still plan every run afresh (`plan_cache_mode`, see
//! `store::pool`): only the parse and the extra round trip are saved.

use std::marker::PhantomData;

use diesel::{
    pg::Pg,
    query_builder::{AstPass, Query, QueryFragment, QueryId},
    serialize::ToSql,
    sql_types::{HasSqlType, Untyped},
};

/// SQL text to bind parameters to, as with `diesel::sql_query`, but cached
/// as a prepared statement on each connection.
#[derive(Debug, Clone, Copy)]
pub struct PreparedSql(&'static str);

/// Starts a statement that is prepared once per connection.
pub fn prepared_sql(sql: &'static str) -> PreparedSql {
    PreparedSql(sql)
}

impl PreparedSql {
    /// Binds `$1`, as `SqlQuery::bind` does.
    pub fn bind<ST, V>(self, value: V) -> Bound<Self, V, ST> {
        Bound::new(self, value)
    }
}

/// A statement with one more parameter bound: `$n` for the n-th `bind`.
/// (Diesel's own type for this is not public.)
#[derive(Debug, Clone, Copy)]
pub struct Bound<Q, V, ST> {
    query: Q,
    value: V,
    sql_type: PhantomData<fn() -> ST>,
}

impl<Q, V, ST> Bound<Q, V, ST> {
    /// `query` with `value` bound as its next parameter, whatever `query`
    /// is: for helpers that bind a group of parameters onto any statement.
    pub(super) fn new(query: Q, value: V) -> Self {
        Self {
            query,
            value,
            sql_type: PhantomData,
        }
    }

    /// Binds the next `$n`.
    pub fn bind<ST2, V2>(self, value: V2) -> Bound<Self, V2, ST2> {
        Bound::new(self, value)
    }
}

impl<Q, V, ST> QueryFragment<Pg> for Bound<Q, V, ST>
where
    Q: QueryFragment<Pg>,
    V: ToSql<ST, Pg>,
    Pg: HasSqlType<ST>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        self.query.walk_ast(out.reborrow())?;
        out.push_bind_param_value_only(&self.value)
    }
}

impl<Q, V, ST> QueryId for Bound<Q, V, ST> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q, V, ST> Query for Bound<Q, V, ST> {
    type SqlType = Untyped;
}

impl QueryFragment<Pg> for PreparedSql {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        out.push_sql(self.0);
        Ok(())
    }
}

/// No static id: the cache key is the SQL text (and the bind types), which
/// is what makes it safe to share one entry between runs.
impl QueryId for PreparedSql {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for PreparedSql {
    type SqlType = Untyped;
}
