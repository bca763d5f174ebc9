//! Failure injection (DESIGN.md §6): real processes killed at chosen points,
//! real connections closed, real sessions terminated; each test proves its
//! fault hit and that no refund was lost or doubled.

mod crashes;
pub(crate) mod harness;
mod messages;
mod outages;
mod servers;
mod soak;
