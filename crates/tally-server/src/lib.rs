mod config;
pub use config::ServeConfig;
