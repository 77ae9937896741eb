//! The Darkroom runner: a process that serves one app. It dials *out* to the gateway and keeps one control channel
//! (a WebSocket) open; see `darkroom_core::protocol`. The gateway's fleet (`darkroom_gateway::fleet`) starts local
//! runner processes.

pub mod agent;
pub mod files;
pub mod realtime;
pub mod tls;

pub use agent::{RunnerConfig, run_runner};
