//! The sprite-facing parsers on arbitrary bytes:
//! - the REST API's request bodies (`api::server::parse_body` into every body type) and the
//!   checks their handlers apply (organization and sprite names, settings patches);
//! - the runtime protocol between host and guest (`vmm_glue::proto`): a guest controls what
//!   the host reads from its virtio-serial port, so the host's frame reader and `Reply`
//!   decoder see attacker bytes;
//! - the management socket inside a sprite (`/.sprite/api.sock`, `vmm_glue::mgmt`): its HTTP
//!   request reader, and every route of the services and Tasks API against a real runtime
//!   in a temporary directory. Requests that would create a service (and so run its `cmd`)
//!   only go as far as the definition's decoding and checks.
//!
//! The first input byte picks the body type; the rest is the body. None may panic; errors
//! carry a 4xx status.

#![no_main]

use api::server::{
    CheckpointBody, CreateOrg, CreateSprite, CreateToken, ForkBody, HibernateBody, UpdateSprite,
    parse_body,
};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use vmm_glue::manager::{Settings, SettingsPatch, validate_name};
use vmm_glue::mgmt::{self, Reply};
use vmm_glue::proto::{self, FrameError};
use vmm_glue::server::ExecRequest;
use vmm_glue::services::{self, Runtime, ServiceDef};

fn runtime() -> &'static Arc<Runtime> {
    static RT: OnceLock<(tempfile::TempDir, Arc<Runtime>)> = OnceLock::new();
    &RT.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let rt = Runtime::open(&dir.path().join("state"), &dir.path().join("run"))
            .expect("runtime over a temporary directory");
        (dir, rt)
    })
    .1
}

fn settings(p: &SettingsPatch) {
    let mut s = Settings::default();
    let _ = p.apply(&mut s);
}

fn names(s: &str) {
    let _ = api::store::validate_org(s);
    let _ = api::store::validate_sprite(s);
    let _ = validate_name(s);
    let _ = services::check_name("service", s);
    let _ = services::parse_duration(s);
    let _ = services::parse_signal(s);
}

fn frames(mut bytes: &[u8]) {
    for _ in 0..64 {
        match proto::read_frame_body(&mut bytes) {
            Ok(body) => {
                let _ = proto::decode::<proto::Reply>(&body);
                let _ = proto::decode::<proto::Request>(&body);
            }
            Err(FrameError::Closed | FrameError::TooLarge(_)) => return,
            Err(e) => panic!("a frame read from memory failed with {e}"),
        }
    }
}

fn management(bytes: &[u8]) {
    let Ok(req) = mgmt::parse_request(bytes) else {
        return;
    };
    let path = req.target.split('?').next().unwrap_or("");
    if req.method == "PUT" && path.starts_with("/v1/services/") {
        // Creating a service runs its command: decode and check the definition only.
        if let Ok(def) = serde_json::from_slice::<ServiceDef>(&req.body) {
            for n in &def.needs {
                let _ = services::check_name("service", n);
            }
        }
        return;
    }
    let status = match mgmt::route(runtime(), &req.method, &req.target, &req.body) {
        Reply::Json(status, _) | Reply::Stream(status, _) => status,
        Reply::NoContent => 204,
    };
    assert!(
        (200..500).contains(&status),
        "{} {} answered {status}",
        req.method,
        req.target
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => {
            if let Ok(b) = parse_body::<CreateOrg>(body) {
                let _ = api::store::validate_org(&b.name);
            }
        }
        1 => {
            let _ = parse_body::<CreateToken>(body);
        }
        2 => {
            if let Ok(b) = parse_body::<CreateSprite>(body) {
                let _ = api::store::validate_sprite(&b.name);
                settings(&b.settings);
            }
        }
        3 => {
            if let Ok(b) = parse_body::<UpdateSprite>(body) {
                settings(&b.settings);
            }
        }
        4 => {
            let _ = parse_body::<HibernateBody>(body);
            let _ = parse_body::<CheckpointBody>(body);
        }
        5 => {
            if let Ok(b) = parse_body::<ForkBody>(body) {
                let _ = api::store::validate_sprite(&b.name);
                settings(&b.settings);
            }
        }
        6 => {
            let _ = parse_body::<ExecRequest>(body);
        }
        7 => frames(body),
        8 => management(body),
        _ => {
            names(&String::from_utf8_lossy(body));
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
                let _ = services::parse_expire(&v);
            }
        }
    }
});
