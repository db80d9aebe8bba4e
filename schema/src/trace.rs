//! Logs and traces for every ablate process.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`). Traces are
//! exported with OpenTelemetry over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and are off otherwise
//! (as with `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`): then no
//! exporter, thread or context header exists. `OTEL_SERVICE_NAME` names the
//! process, else each binary's default. The other standard variables
//! (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_SCHEDULE_DELAY`, ...) apply as usual.
//!
//! A trace crosses processes in the W3C `traceparent` form: in gRPC metadata
//! (every client call made inside a span carries it, see [`crate::Bearer`]),
//! in the database (an experiment keeps its submit's, so each trial's spans
//! join the trace `ablate submit` began), and in a trial's input to its process.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The exporting provider, when traces are on in this process.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Keeps traces flowing until it is dropped, which exports what is left.
#[must_use = "traces stop when the guard is dropped"]
pub struct Guard {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = PROVIDER.get() {
            let _ = provider.shutdown();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Whether this process exports traces.
pub fn enabled() -> bool {
    PROVIDER.get().is_some()
}

/// Exports the spans that have ended so far, waiting for the collector's answer.
pub fn flush() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.force_flush();
    }
}

/// The OTLP endpoint the environment asks traces to go to, if any.
fn endpoint() -> Option<(&'static str, String)> {
    let disabled = |name: &str, value: &str| {
        std::env::var(name)
            .map(|v| v.trim().eq_ignore_ascii_case(value))
            .unwrap_or(false)
    };
    if disabled("OTEL_SDK_DISABLED", "true") || disabled("OTEL_TRACES_EXPORTER", "none") {
        return None;
    }
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .into_iter()
        .find_map(|name| {
            let value = std::env::var(name).ok()?;
            (!value.trim().is_empty()).then(|| (name, value.trim().to_string()))
        })
}

/// Sets up logging, and tracing when the environment asks for it. Errors name
/// the variable to fix.
pub fn init(default_service: &str) -> Result<Guard, String> {
    // Colours only for a terminal: logs kept in files and trials' logs stay plain text.
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()));
    let Some((variable, endpoint)) = endpoint() else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Guard { runtime: None });
    };
    let uri: http::Uri = endpoint.parse().map_err(|e| {
        format!("{variable}=`{endpoint}`: {e}; set it to the collector's OTLP/gRPC address, such as http://127.0.0.1:4317, or unset it")
    })?;
    if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
        return Err(format!(
            "{variable}=`{endpoint}` is not an http:// or https:// address; set it to the collector's OTLP/gRPC address, such as http://127.0.0.1:4317, or unset it"
        ));
    }
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default_service.to_string());
    // The exporter speaks gRPC through tonic, which needs a Tokio reactor; the
    // batch processor exports from a thread of its own, so it gets one here.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ablate-trace-export")
        .enable_all()
        .build()
        .map_err(|e| format!("traces: cannot start their export thread: {e}"))?;
    let inner = {
        let _entered = runtime.enter();
        use opentelemetry_otlp::WithExportConfig;
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| format!("{variable}=`{endpoint}`: {e}"))?
    };
    let exporter = OnRuntime {
        inner: Arc::new(inner),
        runtime: runtime.handle().clone(),
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.clone())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("ablate");
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::Targets::new().with_target("ablate", tracing::Level::INFO));
    tracing_subscriber::registry().with(logs).with(spans).init();
    let _ = PROVIDER.set(provider);
    tracing::debug!(%service, %endpoint, "exporting traces");
    Ok(Guard { runtime: Some(runtime) })
}

/// Runs the OTLP exporter's calls on the trace runtime.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(format!("trace export: {e}"))))
        }
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// A span's context in the W3C `traceparent` form; `None` when traces are off.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// The current span's context in the W3C `traceparent` form.
pub fn current() -> Option<String> {
    traceparent(&tracing::Span::current())
}

/// Makes `span` a child of the span a `traceparent` names (ignored when traces
/// are off, or when it is empty or malformed).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if !enabled() || traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(context);
}

/// Makes `span` a child of the caller's span, named by the request's `traceparent` header.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if let Some(value) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        set_parent(span, value);
    }
}

/// Adds the current span's `traceparent` to a call's metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if let Some(value) = current().and_then(|v| v.parse().ok()) {
        metadata.insert("traceparent", value);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_an_endpoint_nothing_is_exported_or_propagated() {
        // init() never ran in this process: it has no provider.
        assert!(!super::enabled());
        let span = tracing::info_span!("x");
        assert_eq!(super::traceparent(&span), None);
        let mut metadata = tonic::metadata::MetadataMap::new();
        super::inject(&mut metadata);
        assert!(metadata.get("traceparent").is_none());
    }
}

/// An OTLP/gRPC trace receiver that keeps every span it is sent, for the tests
/// and the bench (a stand-in for a collector).
pub mod receiver {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use opentelemetry_proto::tonic::common::v1::any_value::Value;

    /// One span as received.
    #[derive(Debug, Clone)]
    pub struct Span {
        pub service: String,
        pub name: String,
        pub trace_id: String,
        pub span_id: String,
        pub parent_span_id: String,
        /// String, integer and boolean attributes, as text.
        pub attributes: HashMap<String, String>,
    }

    #[derive(Clone, Default)]
    pub struct Receiver {
        spans: Arc<Mutex<Vec<Span>>>,
    }

    impl Receiver {
        /// Serves on a free loopback port until the runtime ends; returns the
        /// receiver and its `http://` address.
        pub async fn start() -> std::io::Result<(Receiver, String)> {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = format!("http://{}", listener.local_addr()?);
            let receiver = Receiver::default();
            let service = TraceServiceServer::new(receiver.clone());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            Ok((receiver, addr))
        }

        /// Every span received so far.
        pub fn spans(&self) -> Vec<Span> {
            self.spans.lock().expect("receiver lock").clone()
        }

        pub fn count(&self) -> usize {
            self.spans.lock().expect("receiver lock").len()
        }
    }

    fn text(value: Option<&Value>) -> Option<String> {
        Some(match value? {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            Value::BoolValue(b) => b.to_string(),
            Value::DoubleValue(d) => d.to_string(),
            _ => return None,
        })
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut kept = Vec::new();
            for resource_spans in request.into_inner().resource_spans {
                let service = resource_spans
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                    .unwrap_or_default();
                for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                    kept.push(Span {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .filter_map(|kv| Some((kv.key.clone(), text(kv.value.as_ref()?.value.as_ref())?)))
                            .collect(),
                    });
                }
            }
            self.spans.lock().expect("receiver lock").extend(kept);
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }
}
