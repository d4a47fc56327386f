//! gRPC end to end through a sidecar pair: a tonic client speaking h2c to
//! the outbound, a tonic server behind the inbound. Unary, server streaming,
//! and a non-OK status that travels in the trailers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut};
use http::uri::PathAndQuery;
use keyproof_tests::free_port;
use keyproof_tests::proxy_support::*;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::tokio_stream::{self, Stream};
use tonic::{Request, Response, Status};

/// Messages are plain UTF-8 strings: no protobuf codegen needed.
#[derive(Clone, Default)]
struct StringCodec;
struct StringEncoder;
struct StringDecoder;

impl Encoder for StringEncoder {
    type Item = String;
    type Error = Status;
    fn encode(&mut self, item: String, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.as_bytes());
        Ok(())
    }
}

impl Decoder for StringDecoder {
    type Item = String;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<String>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| Status::invalid_argument("not UTF-8"))
    }
}

impl Codec for StringCodec {
    type Encode = String;
    type Decode = String;
    type Encoder = StringEncoder;
    type Decoder = StringDecoder;
    fn encoder(&mut self) -> StringEncoder {
        StringEncoder
    }
    fn decoder(&mut self) -> StringDecoder {
        StringDecoder
    }
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type MsgStream = Pin<Box<dyn Stream<Item = Result<String, Status>> + Send>>;

struct Unary;
impl tower_service::Service<Request<String>> for Unary {
    type Response = Response<String>;
    type Error = Status;
    type Future = BoxFut<Result<Response<String>, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<String>) -> Self::Future {
        let caller = req
            .metadata()
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        let msg = req.into_inner();
        Box::pin(async move { Ok(Response::new(format!("echo {msg} | {caller}"))) })
    }
}

struct Counting;
impl tower_service::Service<Request<String>> for Counting {
    type Response = Response<MsgStream>;
    type Error = Status;
    type Future = BoxFut<Result<Response<MsgStream>, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<String>) -> Self::Future {
        let n: usize = req.into_inner().parse().unwrap_or(3);
        Box::pin(async move {
            let items: Vec<Result<String, Status>> = (0..n)
                .map(|i| Ok(format!("item {i}")))
                .chain(std::iter::once(Err(Status::data_loss("stream ends here"))))
                .collect();
            Ok(Response::new(
                Box::pin(tokio_stream::iter(items)) as MsgStream
            ))
        })
    }
}

#[derive(Clone)]
struct EchoService;

impl tonic::server::NamedService for EchoService {
    const NAME: &'static str = "test.Echo";
}

impl tower_service::Service<http::Request<tonic::body::Body>> for EchoService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFut<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(StringCodec);
            Ok(match req.uri().path() {
                "/test.Echo/Unary" => grpc.unary(Unary, req).await,
                "/test.Echo/Count" => grpc.server_streaming(Counting, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

#[test]
fn grpc_through_the_sidecar_pair() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let app_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EchoService)
            .serve(app_addr)
            .await
    });
    keyproof_tests::wait_for_port(app_addr, Duration::from_secs(5));

    let pki = Pki::new("grpc.test");
    let server = pki.issue("server", "/ns/default/sa/grpc");
    let client = pki.issue("client", "/ns/default/sa/web");
    let port = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
    let (in_addr, in_admin, out_addr, out_admin) = (port(), port(), port(), port());
    let _inbound = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &format!(
            "{}[inbound]\nlisten = \"{in_addr}\"\napp = \"{app_addr}\"\n[admin]\nlisten = \"{in_admin}\"\n",
            identity_toml(&pki.bundle, &server)
        ),
        in_admin,
    );
    let outbound = ProxyProc::start(
        pki.tmp.path(),
        "out",
        &format!(
            "{}[outbound]\nlisten = \"{out_addr}\"\n[[outbound.upstreams]]\nhost = \"grpc.default.svc\"\naddress = \"{in_addr}\"\nidentity = \"spiffe://grpc.test/ns/default/sa/grpc\"\n[admin]\nlisten = \"{out_admin}\"\n",
            identity_toml(&pki.bundle, &client)
        ),
        out_admin,
    );

    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{out_addr}"))
            .unwrap()
            .origin("http://grpc.default.svc".parse().unwrap())
            .connect()
            .await
            .expect("connect to outbound");
        let mut grpc = tonic::client::Grpc::new(channel);

        for i in 0..5 {
            grpc.ready().await.unwrap();
            let resp = grpc
                .unary(
                    Request::new(format!("hello {i}")),
                    PathAndQuery::from_static("/test.Echo/Unary"),
                    StringCodec,
                )
                .await
                .unwrap_or_else(|s| panic!("unary failed: {s:?}\n{}", outbound.log_text()));
            let msg = resp.into_inner();
            assert!(
                msg.starts_with(&format!(
                    "echo hello {i} | By=spiffe://grpc.test/ns/default/sa/grpc;Hash="
                )),
                "{msg}"
            );
            assert!(
                msg.ends_with(";URI=spiffe://grpc.test/ns/default/sa/web"),
                "{msg}"
            );
        }

        grpc.ready().await.unwrap();
        let mut stream = grpc
            .server_streaming(
                Request::new("4".to_string()),
                PathAndQuery::from_static("/test.Echo/Count"),
                StringCodec,
            )
            .await
            .expect("server streaming")
            .into_inner();
        let mut got = Vec::new();
        let end = loop {
            match stream.message().await {
                Ok(Some(m)) => got.push(m),
                Ok(None) => break None,
                Err(s) => break Some(s),
            }
        };
        assert_eq!(got, vec!["item 0", "item 1", "item 2", "item 3"]);
        // The status rides in the HTTP/2 trailers through both sidecars.
        let status = end.expect("a trailing status");
        assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
        assert_eq!(status.message(), "stream ends here");
    });
    // One multiplexed h2 mesh connection carried everything.
    assert_eq!(
        outbound.metric("keyproof_tls_handshakes_total{direction=\"outbound\",result=\"ok\"}"),
        1.0
    );
}
