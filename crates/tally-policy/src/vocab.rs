//! The record vocabulary: every attribute a policy may name, its CEL type,
//! and the OpenTelemetry attribute a kept access-log record carries it as.
//!
//! Names follow Envoy's attribute vocabulary (`request.*`, `response.*`,
//! `connection.*`, `source.*`, `destination.*`, `xds.*`); `route.*`,
//! `project` and `gen_ai.*` are derived by Tally from the record (the
//! HTTPRoute named by `route_name`, the owning project, the AI gateway's
//! token-usage fields). The table is the documentation: README.md lists it.
//!
//! **Invariant:** every name is unique, and no name is a prefix (up to a
//! dot) of another leaf's name, so a dotted path either names one leaf, is
//! a namespace of leaves, or names nothing.

/// The type of an attribute, or of a CEL sub-expression, as the checker
/// infers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ty {
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    Duration,
    Timestamp,
    /// A map from header names (lower case) to values.
    StringMap,
    /// A list literal (its elements are checked one by one).
    List,
    /// A map literal.
    Map,
    Null,
    /// `type(x)` and the like: anything goes.
    Dyn,
    /// A dotted prefix of attribute names (`request`, `gen_ai.usage`).
    Namespace,
}

impl Ty {
    /// The name CEL gives the type (messages say it).
    pub fn name(self) -> &'static str {
        match self {
            Ty::Bool => "bool",
            Ty::Int => "int",
            Ty::Uint => "uint",
            Ty::Double => "double",
            Ty::String => "string",
            Ty::Bytes => "bytes",
            Ty::Duration => "google.protobuf.Duration",
            Ty::Timestamp => "google.protobuf.Timestamp",
            Ty::StringMap => "map(string, string)",
            Ty::List => "list",
            Ty::Map => "map",
            Ty::Null => "null_type",
            Ty::Dyn => "dyn",
            Ty::Namespace => "attribute namespace",
        }
    }

    /// Whether values of the type are numbers.
    pub fn is_numeric(self) -> bool {
        matches!(self, Ty::Int | Ty::Uint | Ty::Double)
    }

    /// Whether a value of the type can be a field, dimension or tag (a
    /// scalar rendered as text).
    pub fn is_scalar(self) -> bool {
        matches!(
            self,
            Ty::Bool
                | Ty::Int
                | Ty::Uint
                | Ty::Double
                | Ty::String
                | Ty::Duration
                | Ty::Timestamp
                | Ty::Dyn
        )
    }
}

/// One attribute of the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attribute {
    /// Its CEL path (`response.code`).
    pub name: &'static str,
    pub ty: Ty,
    /// The OpenTelemetry attribute a kept log record carries it as.
    pub otel: &'static str,
    /// What it is.
    pub doc: &'static str,
}

/// Index of an attribute in [`ATTRIBUTES`].
pub type AttrId = usize;

macro_rules! vocabulary {
    ($( $id:ident = ($name:literal, $ty:ident, $otel:literal, $doc:literal), )*) => {
        /// Every attribute, in a fixed order (their ids).
        pub const ATTRIBUTES: &[Attribute] = &[
            $( Attribute { name: $name, ty: Ty::$ty, otel: $otel, doc: $doc }, )*
        ];
        /// The id of each attribute.
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum A { $( $id, )* }
    };
}

vocabulary! {
    RequestTime = ("request.time", Timestamp, "tally.request.time", "when the first byte was received (`start_time`)"),
    RequestMethod = ("request.method", String, "http.request.method", "the HTTP method"),
    RequestPath = ("request.path", String, "url.path", "the path, query included"),
    RequestHost = ("request.host", String, "server.address", "the `:authority` (host) header"),
    RequestScheme = ("request.scheme", String, "url.scheme", "`http` or `https`"),
    RequestProtocol = ("request.protocol", String, "network.protocol.name", "`HTTP/1.1`, `HTTP/2`..."),
    RequestId = ("request.id", String, "http.request.id", "the `x-request-id` header"),
    RequestUserAgent = ("request.useragent", String, "user_agent.original", "the `user-agent` header"),
    RequestReferer = ("request.referer", String, "http.request.header.referer", "the `referer` header"),
    RequestDuration = ("request.duration", Duration, "http.server.request.duration", "from the first byte received to the last byte sent"),
    RequestSize = ("request.size", Int, "http.request.body.size", "body bytes received"),
    RequestTotalSize = ("request.total_size", Int, "http.request.size", "bytes received on the wire, headers included"),
    RequestHeaders = ("request.headers", StringMap, "http.request.header", "request headers the proxy logged, by lower-case name"),
    ResponseCode = ("response.code", Int, "http.response.status_code", "the HTTP status code"),
    ResponseCodeDetails = ("response.code_details", String, "envoy.response.code_details", "why the proxy answered so"),
    ResponseFlags = ("response.flags", String, "envoy.response.flags", "Envoy's response flags (`UH`, `UF`...)"),
    ResponseSize = ("response.size", Int, "http.response.body.size", "body bytes sent"),
    ResponseTotalSize = ("response.total_size", Int, "http.response.size", "bytes sent on the wire, headers included"),
    ResponseHeaders = ("response.headers", StringMap, "http.response.header", "response headers the proxy logged, by lower-case name"),
    ConnectionId = ("connection.id", Uint, "envoy.connection.id", "the downstream connection's id"),
    ConnectionMtls = ("connection.mtls", Bool, "tls.client.certificate_presented", "whether the client presented a certificate"),
    ConnectionSni = ("connection.requested_server_name", String, "tls.client.server_name", "the SNI the client asked for"),
    ConnectionTlsVersion = ("connection.tls_version", String, "tls.protocol.version", "the TLS version"),
    SourceAddress = ("source.address", String, "client.address", "the downstream peer's address"),
    SourcePort = ("source.port", Int, "client.port", "the downstream peer's port"),
    DestinationAddress = ("destination.address", String, "server.address", "the local address that took the request"),
    DestinationPort = ("destination.port", Int, "server.port", "the local port that took the request"),
    XdsUpstreamHost = ("xds.upstream_host", String, "envoy.upstream.host", "the upstream host that served the request"),
    RouteName = ("route.name", String, "http.route", "the route as logged (`httproute/<ns>/<name>/rule/<n>`)"),
    RouteNamespace = ("route.namespace", String, "k8s.namespace.name", "the HTTPRoute's namespace"),
    RouteHttproute = ("route.httproute", String, "gateway.httproute.name", "the HTTPRoute's name"),
    RouteRule = ("route.rule", Int, "gateway.httproute.rule", "the rule's index in the HTTPRoute"),
    RouteGateway = ("route.gateway", String, "gateway.name", "the Gateway that served the request"),
    RouteGatewayNamespace = ("route.gateway_namespace", String, "gateway.namespace", "the Gateway's namespace"),
    Project = ("project", String, "tally.project.name", "the project that owns the route"),
    GenAiInputTokens = ("gen_ai.usage.input_tokens", Int, "gen_ai.usage.input_tokens", "input tokens, cached ones included"),
    GenAiOutputTokens = ("gen_ai.usage.output_tokens", Int, "gen_ai.usage.output_tokens", "output tokens"),
    GenAiCacheReadTokens = ("gen_ai.usage.cache_read.input_tokens", Int, "gen_ai.usage.cache_read.input_tokens", "input tokens read from the provider's cache"),
    GenAiCacheCreationTokens = ("gen_ai.usage.cache_creation.input_tokens", Int, "gen_ai.usage.cache_creation.input_tokens", "input tokens written to the provider's cache"),
    GenAiRequestModel = ("gen_ai.request.model", String, "gen_ai.request.model", "the model asked for"),
    GenAiResponseModel = ("gen_ai.response.model", String, "gen_ai.response.model", "the model that answered"),
    GenAiProviderName = ("gen_ai.provider.name", String, "gen_ai.provider.name", "the provider (`openai`, `anthropic`...)"),
    GenAiOperationName = ("gen_ai.operation.name", String, "gen_ai.operation.name", "`chat`, `embeddings`..."),
}

/// How many attributes there are.
pub const COUNT: usize = ATTRIBUTES.len();

/// The roots of the vocabulary: the only identifiers an expression may use.
pub const ROOTS: &[&str] = &[
    "request",
    "response",
    "connection",
    "source",
    "destination",
    "xds",
    "route",
    "project",
    "gen_ai",
];

/// Field names a policy may list besides the vocabulary's, and the
/// attribute each stands for (Envoy's access-log operator names).
pub const ALIASES: &[(&str, A)] = &[("start_time", A::RequestTime)];

/// The attribute named `name` (a vocabulary name or an alias).
pub fn lookup(name: &str) -> Option<AttrId> {
    ATTRIBUTES.iter().position(|a| a.name == name).or_else(|| {
        ALIASES
            .iter()
            .find(|(alias, _)| *alias == name)
            .map(|(_, a)| *a as usize)
    })
}

/// Whether `prefix` is a namespace of attributes (`gen_ai.usage`).
pub fn is_namespace(prefix: &str) -> bool {
    ATTRIBUTES.iter().any(|a| {
        a.name.len() > prefix.len()
            && a.name.starts_with(prefix)
            && a.name.as_bytes()[prefix.len()] == b'.'
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_no_leaf_is_a_namespace() {
        for (i, a) in ATTRIBUTES.iter().enumerate() {
            assert_eq!(lookup(a.name), Some(i), "{}", a.name);
            assert!(!is_namespace(a.name), "{} is also a namespace", a.name);
            let root = a.name.split('.').next().unwrap_or_default();
            assert!(ROOTS.contains(&root), "{}", a.name);
        }
        assert_eq!(A::GenAiOperationName as usize, COUNT - 1);
    }
}
