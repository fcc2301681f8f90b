//! Wake-on-request HTTP proxy. A request for `<sprite>.<domain>` (Host header) or
//! `/s/<sprite>/<path>` wakes the sprite, waits until its HTTP port accepts a connection
//! (held up to the wake timeout) and is forwarded to it through the guest runtime's TCP
//! tunnel (no guest networking needed). The sprite stays awake while a response streams.

use crate::manager::{Manager, SpriteError};
use crate::proto::{Event, Op};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Body = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Which sprite a request is for, and the path to forward.
pub fn route(host: Option<&str>, path_and_query: &str, domain: &str) -> Option<(String, String)> {
    if let Some(h) = host {
        let h = h.split(':').next().unwrap_or(h);
        if let Some(name) = h.strip_suffix(domain).and_then(|p| p.strip_suffix('.'))
            && !name.is_empty()
            && !name.contains('.')
        {
            return Some((name.to_string(), path_and_query.to_string()));
        }
    }
    let rest = path_and_query.strip_prefix("/s/")?;
    let (name, tail) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if name.is_empty() {
        return None;
    }
    let tail = if tail.starts_with('?') {
        format!("/{tail}")
    } else {
        tail.to_string()
    };
    Some((name.to_string(), tail))
}

/// Decides whether a request may reach a sprite: `Err((status, message))` refuses it. The
/// user-facing API plugs its URL auth in here; `sprited` alone allows everything.
pub type Authorize =
    Arc<dyn Fn(&str, &hyper::HeaderMap) -> Result<(), (StatusCode, String)> + Send + Sync>;

/// Serves the proxy on `listener` until `stop`.
pub async fn serve(
    manager: Arc<Manager>,
    listener: tokio::net::TcpListener,
    stop: tokio_util::sync::CancellationToken,
) {
    serve_with(manager, listener, stop, Arc::new(|_, _| Ok(()))).await
}

/// [`serve`] with an authorization hook.
pub async fn serve_with(
    manager: Arc<Manager>,
    listener: tokio::net::TcpListener,
    stop: tokio_util::sync::CancellationToken,
    authorize: Authorize,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(%e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let m = manager.clone();
        let auth = authorize.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let m = m.clone();
                let auth = auth.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(m, auth, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

async fn handle(m: Arc<Manager>, authorize: Authorize, req: Request<Incoming>) -> Response<Body> {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let Some((name, path)) = route(host.as_deref(), &pq, &m.config().domain) else {
        return text(
            StatusCode::NOT_FOUND,
            format!(
                "no sprite in this request: use http://<sprite>.{}/ or /s/<sprite>/",
                m.config().domain
            ),
        );
    };
    if let Err((status, msg)) = authorize(&name, req.headers()) {
        return text(status, msg);
    }
    let default_port = match m.view(&name) {
        Ok(v) => v.record.settings.http_port,
        Err(e) => return text(StatusCode::NOT_FOUND, e.to_string()),
    };
    let (guard, agent) = match m.hold(&name, "http request").await {
        Ok(x) => x,
        Err(e @ SpriteError::NotFound(_)) => return text(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("waking {name}: {e}"),
            );
        }
    };
    // A service with an HTTP port takes the URL (the runtime starts it when it does not
    // run); otherwise the sprite's own port. An older runtime without services answers with
    // an error: the default port then.
    let port = match agent.call(Op::HttpTarget, m.config().agent_timeout).await {
        Ok(v) => v["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(default_port),
        Err(_) => default_port,
    };
    // Hold the request until the port answers (a cold boot starts the server late).
    let deadline = tokio::time::Instant::now() + m.config().boot_timeout;
    let (conn_id, mut events) = loop {
        let mut ev = match agent.open(Op::TcpOpen { port }) {
            Ok(ev) => ev,
            Err(e) => return text(StatusCode::BAD_GATEWAY, format!("{name}: {e}")),
        };
        match tokio::time::timeout(m.config().agent_timeout, ev.next()).await {
            Ok(Some(Event::Ok { .. })) => break (ev.id, ev),
            Ok(Some(Event::Error { message, .. })) => {
                if tokio::time::Instant::now() >= deadline {
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!("{name}: nothing answers on port {port}: {message}"),
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("{name}: the guest runtime did not open the connection"),
                );
            }
        }
    };
    // A byte pipe: hyper's client on one end, the tunnel on the other.
    let (client_end, mut tunnel_end) = tokio::io::duplex(256 << 10);
    let a = agent.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            tokio::select! {
                n = tunnel_end.read(&mut buf) => match n {
                    Ok(0) | Err(_) => {
                        let _ = a.notify(Op::TcpClose { conn: conn_id });
                        break;
                    }
                    Ok(n) => {
                        if a.notify(Op::TcpSend { conn: conn_id, data: buf[..n].to_vec() }).is_err() {
                            break;
                        }
                    }
                },
                ev = events.next() => match ev {
                    Some(Event::TcpData { data }) => {
                        if tunnel_end.write_all(&data).await.is_err() {
                            let _ = a.notify(Op::TcpClose { conn: conn_id });
                            break;
                        }
                    }
                    _ => {
                        let _ = tunnel_end.shutdown().await;
                        // Drain what the client still writes until it closes.
                        while let Ok(n) = tunnel_end.read(&mut buf).await {
                            if n == 0 { break; }
                        }
                        break;
                    }
                },
            }
        }
    });
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(TokioIo::new(client_end)).await {
            Ok(x) => x,
            Err(e) => return text(StatusCode::BAD_GATEWAY, format!("{name}: {e}")),
        };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (mut parts, body) = req.into_parts();
    parts.uri = match path.parse() {
        Ok(u) => u,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad path: {e}")),
    };
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            // The guard lives as long as the response body streams.
            let body = body
                .map_frame(move |f| {
                    guard.touch();
                    f
                })
                .boxed();
            Response::from_parts(parts, body)
        }
        Err(e) => text(StatusCode::BAD_GATEWAY, format!("{name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn routes() {
        let d = "sprites.localhost";
        assert_eq!(
            route(Some("web.sprites.localhost:8480"), "/a?b=1", d),
            Some(("web".into(), "/a?b=1".into()))
        );
        assert_eq!(
            route(Some("127.0.0.1:8480"), "/s/web/x/y", d),
            Some(("web".into(), "/x/y".into()))
        );
        assert_eq!(route(None, "/s/web", d), Some(("web".into(), "/".into())));
        assert_eq!(
            route(None, "/s/web?q", d),
            Some(("web".into(), "/?q".into()))
        );
        assert_eq!(route(Some("a.b.sprites.localhost"), "/", d), None);
        assert_eq!(route(Some("localhost"), "/other", d), None);
        assert_eq!(route(None, "/s/", d), None);
    }
}
