//! The ESP mode's part of `run`: the node key, the generation, the xfrm
//! applier, the UDP 4500 socket and the timers (keepalives, rotation,
//! removal of SAs past their grace period).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use fabedge_common::peer_kind;
use log::{info, warn};

use crate::{
    apply::xfrm::{Generations, XfrmApplier},
    keys::NodeKey,
    model::{Role, Snapshot},
    natt::EncapSocket,
    plan::{
        ESP_IN_UDP_PORT, Plan, Settings,
        esp::{ObservedEndpoints, plan_esp},
    },
};

/// A `fabedge-agent rotate-key` request: a file in the state dir.
pub const ROTATE_REQUEST: &str = "rotate-key.request";

#[derive(Debug, Clone)]
pub struct EspOptions {
    /// Rotate keys this often (`None`: only on `rotate-key`).
    pub rotation_interval: Option<Duration>,
    /// How long SAs of a former generation keep decrypting.
    pub grace: Duration,
    /// Edge nodes: how often a keepalive goes to each peer's UDP 4500.
    pub keepalive: Duration,
}

pub struct EspRuntime {
    key: NodeKey,
    generations: Generations,
    applier: XfrmApplier,
    socket: EncapSocket,
    state_dir: PathBuf,
    options: EspOptions,
    last_rotation: Instant,
    last_keepalive: Option<Instant>,
    keepalive_peers: Vec<SocketAddrV4>,
    last: Option<(Snapshot, Plan)>,
}

/// Ask the agent using `state_dir` to rotate its keys.
pub fn request_rotation(state_dir: &Path) -> Result<PathBuf> {
    let path = state_dir.join(ROTATE_REQUEST);
    std::fs::write(&path, b"").with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

impl EspRuntime {
    pub fn start(state_dir: &Path, options: EspOptions) -> Result<Self> {
        let key = NodeKey::load_or_create(state_dir)?;
        let generations = Generations::load(state_dir)?;
        let socket = EncapSocket::bind()?;
        info!(
            "ESP mode: public key {}, generation {}, UDP {ESP_IN_UDP_PORT} held",
            key.public().to_base64(),
            generations.generation
        );
        Ok(EspRuntime {
            key,
            generations,
            applier: XfrmApplier::new(options.grace),
            socket,
            state_dir: state_dir.to_owned(),
            options,
            last_rotation: Instant::now(),
            last_keepalive: None,
            keepalive_peers: Vec::new(),
            last: None,
        })
    }

    /// What the plan publishes about this node.
    pub fn fill_settings(&self, settings: &mut Settings) {
        settings.esp_public_key = Some(self.key.public().to_base64());
        settings.esp_generation = self.generations.generation;
    }

    /// Bring xfrm in line with `plan`. `Ok(true)`: the generation changed
    /// (a key would have been reused): plan again before anything else.
    pub fn apply(&mut self, snapshot: &Snapshot, plan: &Plan) -> Result<bool> {
        let esp = plan_esp(
            snapshot,
            plan,
            &self.key,
            self.generations.generation,
            &ObservedEndpoints::new(),
        );
        if XfrmApplier::reuses_a_key(&esp, &self.generations)? {
            let generation = self.generations.bump()?;
            info!(
                "ESP: outbound SAs must be created anew; new generation {generation} (keys are never reused)"
            );
            return Ok(true);
        }
        for warning in &esp.warnings {
            warn!("{warning}");
        }
        let report = self.applier.apply(&esp, &mut self.generations)?;
        if report != Default::default() {
            info!("ESP: {report:?}");
        }
        self.keepalive_peers = if plan.role == Role::Edge {
            plan.peers
                .values()
                .filter(|p| p.kind == peer_kind::TUNNEL)
                .map(|p| SocketAddrV4::new(Ipv4Addr::from(p.underlay_ip), ESP_IN_UDP_PORT))
                .collect()
        } else {
            Vec::new()
        };
        self.last = Some((snapshot.clone(), plan.clone()));
        Ok(false)
    }

    /// Timers. `Ok(true)`: a new generation started; re-plan fully.
    pub fn tick(&mut self) -> Result<bool> {
        let now = Instant::now();
        if self
            .last_keepalive
            .is_none_or(|t| now.duration_since(t) >= self.options.keepalive)
        {
            for (peer, e) in self.socket.keepalive(&self.keepalive_peers) {
                log::debug!("ESP keepalive to {peer}: {e}");
            }
            self.last_keepalive = Some(now);
        }
        let request = self.state_dir.join(ROTATE_REQUEST);
        let requested = request.exists();
        let scheduled = self
            .options
            .rotation_interval
            .is_some_and(|every| now.duration_since(self.last_rotation) >= every);
        if requested || scheduled {
            let _ = std::fs::remove_file(&request);
            let generation = self.generations.bump()?;
            self.last_rotation = now;
            info!(
                "ESP: rotating keys ({}): generation {generation}",
                if requested {
                    "fabedge-agent rotate-key"
                } else {
                    "scheduled"
                }
            );
            return Ok(true);
        }
        if self.applier.has_pending_removals()
            && let Some((snapshot, plan)) = self.last.take()
        {
            let result = self.apply(&snapshot, &plan);
            if self.last.is_none() {
                self.last = Some((snapshot, plan));
            }
            return result;
        }
        Ok(false)
    }
}
