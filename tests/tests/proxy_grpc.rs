//! gRPC end to end through a sidecar pair: a tonic client speaking h2c to
//! the outbound, a tonic server behind the inbound. Unary, server streaming,
//! and a non-OK status that travels in the trailers; and one caller's
//! never-ending streams not holding up another caller.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Bidirectional: each message echoed as it comes, the head at once.
struct Chat;
/// Chats the app has begun.
static CHATS: AtomicUsize = AtomicUsize::new(0);
impl tower_service::Service<Request<tonic::Streaming<String>>> for Chat {
    type Response = Response<MsgStream>;
    type Error = Status;
    type Future = BoxFut<Result<Response<MsgStream>, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<tonic::Streaming<String>>) -> Self::Future {
        use tokio_stream::StreamExt;
        CHATS.fetch_add(1, Ordering::SeqCst);
        let incoming = req.into_inner();
        Box::pin(async move {
            Ok(Response::new(
                Box::pin(incoming.map(|m| m.map(|s| format!("chat {s}")))) as MsgStream,
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
                "/test.Echo/Chat" => grpc.streaming(Chat, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// The tonic echo app on a port of its own (taking at most `max_streams`
/// streams per connection), on a runtime the test keeps.
fn echo_app(max_streams: Option<u32>) -> (tokio::runtime::Runtime, SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let app_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .max_concurrent_streams(max_streams)
            .add_service(EchoService)
            .serve(app_addr)
            .await
    });
    keyproof_tests::wait_for_port(app_addr, Duration::from_secs(5));
    (rt, app_addr)
}

#[test]
fn grpc_through_the_sidecar_pair() {
    let (rt, app_addr) = echo_app(None);

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

/// A caller whose streams never end cannot hold up another caller, though
/// the app takes only 2 streams per connection: the inbound bounds the
/// first caller's streams by its share (`max_app_connections_per_peer`)
/// and opens another connection to the app when one is full.
#[test]
fn one_callers_endless_grpc_streams_do_not_hold_up_another_caller() {
    let (rt, app_addr) = echo_app(Some(2));

    let pki = Pki::new("grpc.test");
    let server = pki.issue("server", "/ns/default/sa/grpc");
    let greedy = pki.issue("greedy", "/ns/default/sa/greedy");
    let other = pki.issue("other", "/ns/default/sa/other");
    let port = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
    let (in_addr, in_admin) = (port(), port());
    let _inbound = ProxyProc::start(
        pki.tmp.path(),
        "in",
        &format!(
            "{}[inbound]\nlisten = \"{in_addr}\"\napp = \"{app_addr}\"\nmax_app_connections = 8\nmax_app_connections_per_peer = 2\napp_connect_timeout = \"1s\"\n[admin]\nlisten = \"{in_admin}\"\n",
            identity_toml(&pki.bundle, &server)
        ),
        in_admin,
    );
    let outbound = |name: &str, id| {
        let (addr, admin) = (port(), port());
        let proc = ProxyProc::start(
            pki.tmp.path(),
            name,
            &format!(
                "{}[outbound]\nlisten = \"{addr}\"\n[[outbound.upstreams]]\nhost = \"grpc.default.svc\"\naddress = \"{in_addr}\"\nidentity = \"spiffe://grpc.test/ns/default/sa/grpc\"\n[admin]\nlisten = \"{admin}\"\n",
                identity_toml(&pki.bundle, id)
            ),
            admin,
        );
        (proc, addr)
    };
    let (_greedy_out, greedy_addr) = outbound("greedy", &greedy);
    let (other_out, other_addr) = outbound("other", &other);

    rt.block_on(async {
        let connect = |addr: SocketAddr| async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .origin("http://grpc.default.svc".parse().unwrap())
                .connect()
                .await
                .expect("connect to outbound");
            tonic::client::Grpc::new(channel)
        };
        let greedy = connect(greedy_addr).await;
        // Four chats whose request streams never end: beyond the app's 2
        // streams on a connection, and beyond the caller's share of 2.
        let mut held = Vec::new();
        for i in 0..4 {
            let mut grpc = greedy.clone();
            held.push(tokio::spawn(async move {
                use tokio_stream::StreamExt;
                let messages =
                    tokio_stream::iter(vec![format!("hold {i}")]).chain(tokio_stream::pending());
                grpc.ready().await.unwrap();
                let resp = grpc
                    .streaming(
                        Request::new(messages),
                        PathAndQuery::from_static("/test.Echo/Chat"),
                        StringCodec,
                    )
                    .await;
                // Held open (or refused): kept until the test ends.
                let kept = resp.map(|r| r.into_inner());
                std::future::pending::<()>().await;
                drop(kept);
            }));
        }
        let begun = tokio::time::Instant::now();
        while CHATS.load(Ordering::SeqCst) < 2 {
            assert!(
                begun.elapsed() < Duration::from_secs(5),
                "the greedy caller's chats never began"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let mut grpc = connect(other_addr).await;
        for i in 0..3 {
            let began = tokio::time::Instant::now();
            grpc.ready().await.unwrap();
            let resp = tokio::time::timeout(
                Duration::from_secs(5),
                grpc.unary(
                    Request::new(format!("hello {i}")),
                    PathAndQuery::from_static("/test.Echo/Unary"),
                    StringCodec,
                ),
            )
            .await
            .unwrap_or_else(|_| panic!("the other caller's RPC {i} waited behind the greedy one"))
            .unwrap_or_else(|s| panic!("unary failed: {s:?}\n{}", other_out.log_text()));
            assert!(resp.into_inner().starts_with(&format!("echo hello {i}")));
            assert!(
                began.elapsed() < Duration::from_secs(2),
                "took {:?}",
                began.elapsed()
            );
        }
        for h in held {
            h.abort();
        }
    });
}
