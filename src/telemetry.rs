//! OpenTelemetry traces (`tracing:`): a span per check, a child span per JWKS refetch a check
//! waits for, exported over OTLP/gRPC.
//!
//! - The parent is the W3C `traceparent` Envoy sends: in the gRPC call's metadata (Envoy's
//!   ext_authz client span), else in the checked request's headers (the CheckRequest's
//!   headers, or the HTTP endpoint's own request headers).
//! - A sampled parent is always followed; a check without one (no parent, or an unsampled
//!   one) is traced with probability `sample_ratio`.
//! - Nothing on the check path waits for the exporter: an ended span goes into a bounded
//!   queue with `try_send`; when the queue is full the span is dropped and counted
//!   (`audgate_trace_spans_dropped_total{reason="queue_full"}`), as are spans the receiver
//!   did not take (`reason="export_failed"`). One task exports in batches.
//! - Without `tracing:` none of this exists: the check path tests one `Option`.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Link, SamplingDecision, SamplingResult, Span as _, SpanKind, Status, TraceContextExt, TraceId, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, ShouldSample, Span, SpanData, SpanExporter, SpanProcessor,
};
use tokio::sync::{mpsc, watch};

use crate::authz::Headers;
use crate::config::TracingConfig;
use crate::metrics;

/// Ended spans waiting for the exporter at most; past this they are dropped (and counted).
pub const QUEUE_SPANS: usize = 4096;
/// Spans per OTLP export request at most.
const BATCH_SPANS: usize = 512;
/// One export request's deadline: a receiver that hangs costs at most this, and only the
/// exporter task waits for it.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// On shutdown, how long the spans still queued get to reach the receiver.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The tracer and the exporter task.
pub struct Telemetry {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
    stop: watch::Sender<bool>,
    exporter: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Build the exporter (it connects lazily: a receiver that is down delays nothing) and
    /// start the export task. Call inside the tokio runtime.
    pub fn start(settings: &TracingConfig) -> Result<Telemetry, String> {
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .build();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.otlp_endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("tracing.otlp_endpoint {}: {e}", settings.otlp_endpoint))?;
        exporter.set_resource(&resource);
        let (queue, spans) = mpsc::channel(QUEUE_SPANS);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(export(exporter, spans, stopped));
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(FollowSampledParent {
                ratio: Sampler::TraceIdRatioBased(settings.sample_ratio),
            })
            .with_span_processor(Queue { queue })
            .build();
        let tracer = provider.tracer("audgate");
        tracing::info!(
            endpoint = %settings.otlp_endpoint,
            sample_ratio = settings.sample_ratio,
            "OpenTelemetry traces on"
        );
        Ok(Telemetry {
            tracer,
            provider,
            propagator: TraceContextPropagator::new(),
            stop,
            exporter: std::sync::Mutex::new(Some(task)),
        })
    }

    /// Start a check's span. The parent comes from `grpc` (the call's metadata) when it has a
    /// `traceparent`, else from the checked request's `headers`.
    pub fn start_check(&self, grpc: Carrier<'_>, headers: Headers<'_>) -> CheckSpan {
        let parent = if grpc.traceparent.is_some() {
            self.propagator.extract(&grpc)
        } else {
            self.propagator.extract(&RequestHeaders(headers))
        };
        let span = self
            .tracer
            .build_with_context(self.tracer.span_builder("check").with_kind(SpanKind::Server), &parent);
        CheckSpan {
            cx: parent.with_span(span),
        }
    }

    /// Send what is queued (within [`FLUSH_TIMEOUT`]) and stop the export task.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let task = self.exporter.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task
            && tokio::time::timeout(FLUSH_TIMEOUT, task).await.is_err()
        {
            tracing::warn!("OpenTelemetry: spans still queued after {FLUSH_TIMEOUT:?} were not sent");
        }
        let _ = self.provider.shutdown();
    }
}

/// The trace context of a gRPC call's metadata.
#[derive(Clone, Copy, Debug, Default)]
pub struct Carrier<'a> {
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent,
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The checked request's headers, as the propagator reads them.
struct RequestHeaders<'a>(Headers<'a>);

impl Extractor for RequestHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.names().collect()
    }
}

/// One check's span, ended with its decision.
pub struct CheckSpan {
    cx: Context,
}

impl CheckSpan {
    /// The trace id (32 hex digits) for the decision log line.
    pub fn trace_id(&self) -> Option<String> {
        let span = self.cx.span();
        let context = span.span_context();
        context.is_valid().then(|| context.trace_id().to_string())
    }

    /// A child span for a JWKS refetch this check waits for.
    pub fn jwks_fetch(&self, telemetry: &Telemetry, issuer: &str) -> JwksSpan {
        let tracer = &telemetry.tracer;
        let span = tracer.build_with_context(
            tracer
                .span_builder("jwks fetch")
                .with_kind(SpanKind::Client)
                .with_attributes([KeyValue::new("audgate.issuer", issuer.to_owned())]),
            &self.cx,
        );
        JwksSpan { span }
    }

    /// End the span with the decision's route, decision and reason (an error decision marks
    /// the span as an error).
    pub fn end(self, route: &str, decision: &'static str, reason: &'static str, issuer: &str) {
        let span = self.cx.span();
        if !span.is_recording() {
            return;
        }
        span.set_attribute(KeyValue::new("audgate.route", route.to_owned()));
        span.set_attribute(KeyValue::new("audgate.decision", decision));
        span.set_attribute(KeyValue::new("audgate.reason", reason));
        if !issuer.is_empty() {
            span.set_attribute(KeyValue::new("audgate.issuer", issuer.to_owned()));
        }
        if decision == "error" {
            span.set_status(Status::error(reason));
        }
        span.end();
    }
}

/// A JWKS refetch's span.
pub struct JwksSpan {
    span: Span,
}

impl JwksSpan {
    /// End it: whether the refetch brought a new key set.
    pub fn end(mut self, refetched: bool) {
        self.span
            .set_attribute(KeyValue::new("audgate.jwks.refetched", refetched));
        self.span.end();
    }
}

/// A sampled parent is followed; anything else (no parent, an invalid or unsampled one) is
/// decided by the ratio. Unlike the SDK's `ParentBased`, which drops every child of an
/// unsampled parent, this is SPEC.md's `sample_ratio`.
#[derive(Clone, Debug)]
struct FollowSampledParent {
    ratio: Sampler,
}

impl ShouldSample for FollowSampledParent {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if let Some(cx) = parent_context {
            let span = cx.span();
            let parent = span.span_context();
            if parent.is_valid() && parent.is_sampled() {
                return SamplingResult {
                    decision: SamplingDecision::RecordAndSample,
                    attributes: Vec::new(),
                    trace_state: parent.trace_state().clone(),
                };
            }
        }
        self.ratio
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

/// The span processor: ended spans into the bounded queue, never waiting.
#[derive(Debug)]
struct Queue {
    queue: mpsc::Sender<SpanData>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(span).is_err() {
            metrics::trace_spans_dropped("queue_full", 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export task: whatever is queued, up to [`BATCH_SPANS`] a request, until `stop`; then
/// what is left.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    mut spans: mpsc::Receiver<SpanData>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(BATCH_SPANS);
    let mut failing = false;
    loop {
        let stopping = tokio::select! {
            n = spans.recv_many(&mut batch, BATCH_SPANS) => n == 0,
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopping {
            while batch.len() < QUEUE_SPANS {
                match spans.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
        }
        while !batch.is_empty() {
            let rest = if batch.len() > BATCH_SPANS {
                batch.split_off(BATCH_SPANS)
            } else {
                Vec::new()
            };
            let n = batch.len();
            match exporter.export(std::mem::replace(&mut batch, rest)).await {
                Ok(()) => {
                    if failing {
                        tracing::info!("OpenTelemetry: spans reach the receiver again");
                        failing = false;
                    }
                }
                Err(e) => {
                    metrics::trace_spans_dropped("export_failed", n as u64);
                    if !failing {
                        tracing::warn!("OpenTelemetry: {n} span(s) not exported: {e}");
                        failing = true;
                    }
                }
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceState};

    fn parent(sampled: bool) -> Context {
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            flags,
            true,
            TraceState::default(),
        ))
    }

    fn decide(ratio: f64, cx: Option<&Context>) -> SamplingDecision {
        let sampler = FollowSampledParent {
            ratio: Sampler::TraceIdRatioBased(ratio),
        };
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        sampler
            .should_sample(cx, trace_id, "check", &SpanKind::Server, &[], &[])
            .decision
    }

    #[test]
    fn a_sampled_parent_is_always_followed() {
        assert_eq!(decide(0.0, Some(&parent(true))), SamplingDecision::RecordAndSample);
    }

    #[test]
    fn without_a_sampled_parent_the_ratio_decides() {
        assert_eq!(decide(0.0, Some(&parent(false))), SamplingDecision::Drop);
        assert_eq!(decide(1.0, Some(&parent(false))), SamplingDecision::RecordAndSample);
        assert_eq!(decide(0.0, None), SamplingDecision::Drop);
        assert_eq!(decide(1.0, None), SamplingDecision::RecordAndSample);
    }

    #[test]
    fn grpc_metadata_carries_the_context() {
        let propagator = TraceContextPropagator::new();
        let carrier = Carrier {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            tracestate: None,
        };
        let cx = propagator.extract(&carrier);
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
    }
}
