//! The payment gateway: our client of the external payment system, and the
//! simulator that stands in for it in the demo and the tests.

pub mod client;
pub mod simulator;
