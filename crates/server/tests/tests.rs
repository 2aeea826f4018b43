//! Integration tests against real `tidewater serve` processes (one test binary).

mod support;
mod tls;

mod auth;
mod binary;
mod cli;
mod console;
mod crash;
mod disk_full;
mod forecast;
mod grafana;
mod hooks;
mod http_api;
mod openapi;
mod policies;
mod pushes;
mod regression;
mod stream_client;
mod upgrade;
