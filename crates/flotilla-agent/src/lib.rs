//! The Flotilla host agent: owns the VMs of one host.
//!
//! It keeps one record per VM on disk, starts QEMU through `flotilla-qemu`,
//! talks to the guest agent through `flotilla-guest-protocol`, wires each VM
//! to the host bridge, and serves an HTTP/JSON API (`http`). Restarting the
//! agent re-adopts the QEMU processes it left running (`adopt`).
//!
//! Architecture invariant: only this crate starts, stops or kills QEMU
//! processes and creates taps; front ends go through [`VmManager`].

pub mod adopt;
pub mod auth;
pub mod capacity;
pub mod config;
pub mod control_link;
pub mod disks;
pub mod error;
pub mod fsutil;
pub mod http;
pub mod isolation;
pub mod manager;
pub mod network;
pub mod record;
pub mod routes;
pub mod runtime;
pub mod server;
pub mod spec;

pub use config::AgentConfig;
pub use error::AgentError;
pub use manager::VmManager;
pub use server::{run_agent, AgentHandle};
