//! Flotilla's control plane: one API for a fleet of hosts. Tenants and
//! their tokens, the host registry (agents heartbeat in), instances with
//! desired and observed state, placement by policy, and durable workflows
//! that drive the host agents. State lives in SQLite or PostgreSQL.

pub mod agents;
pub mod auth;
pub mod error;
mod fleet_cache;
pub mod http;
pub mod placement;
pub mod server;
pub mod service;
pub mod store;
pub mod workflows;

pub use error::{ControlError, ControlResult};
pub use server::{run_control, ControlConfig};
pub use service::{ControlPlane, ControlSettings};
