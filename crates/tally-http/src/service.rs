//! Each request of a connection: counted in flight until its response is
//! sent, its body bound to a deadline, handed to the router.
//!
//! **Invariant:** a request whose body missed its deadline is answered with
//! the server's `408` (and `Connection: close`), whatever the handler made
//! of the failed read; the handler never sees the body whole, so nothing of
//! it is stored.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, header};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tower::ServiceExt as _;
use tower_http::timeout::{DeadlineBody, TimeoutError};

use crate::connection::{Activity, InFlight};
use crate::stats::ConnectionStats;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The answer to a request whose body missed its deadline (`408`, in the
/// server's error format); given the body-read timeout.
pub type BodyTimeoutAnswer = fn(Duration) -> axum::response::Response;

/// The hyper service of one connection.
#[derive(Clone)]
pub(crate) struct Requests {
    pub(crate) app: Router,
    pub(crate) stats: ConnectionStats,
    pub(crate) body_read_timeout: Duration,
    pub(crate) answer: BodyTimeoutAnswer,
    /// The connection's; `None` in the template every connection copies.
    pub(crate) activity: Option<Arc<Activity>>,
}

impl Requests {
    /// This service for the connection whose activity is `activity`.
    pub(crate) fn on(&self, activity: Arc<Activity>) -> Requests {
        Requests {
            activity: Some(activity),
            ..self.clone()
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for Requests {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Tracked>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = self.activity.as_ref().map(Activity::request_started);
        let late = Arc::new(AtomicBool::new(false));
        let request = if request.body().is_end_stream() {
            request.map(Body::new)
        } else {
            let timeout = self.body_read_timeout;
            let late = Arc::clone(&late);
            request.map(|body| {
                Body::new(Deadline {
                    body: DeadlineBody::new(timeout, body),
                    late,
                })
            })
        };
        let app = self.app.clone();
        let stats = self.stats.clone();
        let (timeout, answer) = (self.body_read_timeout, self.answer);
        Box::pin(async move {
            let Ok(mut response) = app.oneshot(request).await;
            if late.load(Ordering::Acquire) {
                stats.add_body_timeout();
                tracing::debug!(timeout = ?timeout, "a request body missed its deadline");
                response = answer(timeout);
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A request body that must arrive whole by a deadline, and remembers
    /// that it did not.
    struct Deadline<B> {
        #[pin]
        body: DeadlineBody<B>,
        late: Arc<AtomicBool>,
    }
}

impl<B> HttpBody for Deadline<B>
where
    B: HttpBody,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.body.poll_frame(cx));
        if let Some(Err(error)) = &frame
            && error.is::<TimeoutError>()
        {
            this.late.store(true, Ordering::Release);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that keeps its request in flight until it is sent or
/// dropped.
pub(crate) struct Tracked {
    body: Body,
    _in_flight: Option<InFlight>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
