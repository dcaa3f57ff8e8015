//! Route table. Handlers stay private to their endpoint-group module.

mod health;

use axum::Router;

use crate::AppState;

pub(crate) fn router() -> Router<AppState> {
    Router::new().merge(health::router())
}
