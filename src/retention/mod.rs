//! Retention: policies that fix each object's expiry, the sweep that
//! crypto-erases expired objects, legal holds, and the customer shred
//! pipeline with its signed certificate.
//!
//! The shred pipeline mirrors KMS key deletion:
//!
//! ```text
//! ACTIVE --request--> PENDING_SHRED --(grace over, approved, no hold)--> destroy keys
//!    ^                     |                                                |
//!    +------cancel---------+                         verify canary, sign certificate
//!                                                                           |
//!                                                                       SHREDDED
//! ```
//!
//! Every step is idempotent and recorded in the catalog before the next
//! starts, so a crash anywhere converges on the next sweep (which also
//! runs at start-up). From the request on, the customer's content is
//! unreadable; after the destroy step it is unrecoverable.

pub mod certificate;
pub mod policy;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::audit::{Actor, AuditLog, Event};
use crate::catalog::{Catalog, CatalogError, CustomerState, ShredRequest, ShredTicket, StoredPolicy};
use crate::clock::Clock;
use crate::error::Error;
use crate::ingest::{Ingest, spool};
use crate::keys::KeyService;
use crate::model::{CustomerId, Hold, HoldId, ObjectId, RetentionPolicy, check_text, format_ms};
use crate::revocation::Revocations;
use crate::store::Store;
use certificate::{CanaryCheck, ShredCertificate, SigningKey};
use policy::Policies;

/// Objects crypto-erased per catalog transaction in a sweep.
const EXPIRY_BATCH: usize = 500;
const MAX_REASON: usize = 1024;
const MAX_NAME: usize = 128;

/// Settings of the retention pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionConfig {
    /// Time between a shred request and the destruction of the keys,
    /// during which the shred can be cancelled. Zero shreds at once.
    pub shred_grace: Duration,
    /// Two-person rule: a second, different person must approve a shred.
    pub shred_requires_approval: bool,
    /// Unfinished uploads older than this (and not streaming) are
    /// discarded by the sweep.
    pub abandoned_upload_ttl: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            shred_grace: Duration::from_secs(7 * 86_400),
            shred_requires_approval: false,
            abandoned_upload_ttl: Duration::from_secs(7 * 86_400),
        }
    }
}

/// What a sweep did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub dry_run: bool,
    /// Objects crypto-erased (due, in a dry run).
    pub objects_expired: u64,
    /// Due objects kept by legal holds.
    pub objects_held: u64,
    /// Pending shreds completed (due, in a dry run).
    pub shreds_completed: u64,
    /// Pending shreds still waiting (grace, approval or a hold).
    pub shreds_waiting: u64,
    pub uploads_abandoned: u64,
    pub orphan_journals_removed: u64,
    /// Ciphertext or journals that could not be deleted now (already
    /// undecryptable; retried by later sweeps).
    pub leftovers: u64,
}

/// A customer's shred state, as reported to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShredStatus {
    pub customer_id: CustomerId,
    pub state: CustomerState,
    /// `None` for an active customer never asked to be shredded.
    pub ticket: Option<ShredTicket>,
    /// Holds now blocking the shred.
    pub blocking_holds: Vec<Hold>,
}

pub struct Retention {
    catalog: Arc<dyn Catalog>,
    store: Store,
    ingest: Arc<Ingest>,
    keys: Arc<KeyService>,
    spool_dir: PathBuf,
    policies: Arc<Policies>,
    clock: Arc<dyn Clock>,
    revocations: Arc<Revocations>,
    signer: Arc<SigningKey>,
    audit: AuditLog,
    cfg: RetentionConfig,
    /// One sweep or shred step at a time.
    work: tokio::sync::Mutex<()>,
}

/// The parts the retention service works on.
pub struct RetentionDeps {
    pub catalog: Arc<dyn Catalog>,
    pub store: Store,
    pub ingest: Arc<Ingest>,
    pub keys: Arc<KeyService>,
    pub spool_dir: PathBuf,
    pub policies: Arc<Policies>,
    pub clock: Arc<dyn Clock>,
    pub revocations: Arc<Revocations>,
    pub signer: Arc<SigningKey>,
    pub audit: AuditLog,
}

fn text(field: &str, value: &str, max: usize) -> Result<String, Error> {
    check_text(field, value, max)?;
    Ok(value.trim().to_owned())
}

impl Retention {
    pub fn new(deps: RetentionDeps, cfg: RetentionConfig) -> Self {
        let RetentionDeps { catalog, store, ingest, keys, spool_dir, policies, clock, revocations, signer, audit } =
            deps;
        Self {
            catalog,
            store,
            ingest,
            keys,
            spool_dir,
            policies,
            clock,
            revocations,
            signer,
            audit,
            cfg,
            work: tokio::sync::Mutex::new(()),
        }
    }

    pub fn signing_key_id(&self) -> &str {
        self.signer.key_id()
    }

    /// Runs `action` under the audit rule: its record first (no record, no
    /// action), and if it then fails, a second record with the outcome.
    async fn audited<T>(
        &self,
        actor: &Actor,
        event: Event,
        action: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        self.audit.append(actor, event.clone()).await?;
        let result = action.await;
        if let Err(e) = &result {
            let _ = self.audit.append(actor, event.result(format!("failed: {e}"))).await;
        }
        result
    }

    // ---- policies ----

    /// Makes the catalog's config-defined policies exactly `configured`
    /// (policies set through the API are kept), then loads them.
    pub async fn sync_config_policies(&self, configured: &[RetentionPolicy]) -> Result<(), Error> {
        let mut names = HashSet::new();
        for p in configured {
            p.validate()?;
            if !names.insert(p.name.as_str()) {
                return Err(Error::Invalid(format!("retention policy {} is defined twice in the config", p.name)));
            }
        }
        let now = self.clock.now_ms();
        for stored in self.catalog.policies().await? {
            if stored.from_config && !names.contains(stored.policy.name.as_str()) {
                self.catalog.delete_policy(&stored.policy.name, true).await?;
            }
        }
        for p in configured {
            self.catalog.put_policy(&StoredPolicy { policy: p.clone(), from_config: true, updated_at_ms: now }).await?;
        }
        self.policies.reload(self.catalog.as_ref()).await?;
        Ok(())
    }

    pub async fn policies(&self) -> Result<Vec<StoredPolicy>, Error> {
        Ok(self.catalog.policies().await?)
    }

    /// Adds or replaces a policy. It applies to objects committed from now
    /// on; with `reapply`, every live object's expiry is recomputed from
    /// its commit time. Returns how many objects changed expiry.
    pub async fn set_policy(&self, actor: &Actor, policy: RetentionPolicy, reapply: bool) -> Result<u64, Error> {
        policy.validate()?;
        let event = Event::new("policy.set")
            .target(&policy.name)
            .detail("kind", policy.kind.name())
            .detail("retain_secs", policy.retain_secs)
            .detail("reapply", reapply);
        let stored = StoredPolicy { policy, from_config: false, updated_at_ms: self.clock.now_ms() };
        self.audited(actor, event, async {
            self.catalog.put_policy(&stored).await?;
            self.policies.reload(self.catalog.as_ref()).await?;
            tracing::info!(policy = %stored.policy.name, reapply, "retention policy set");
            if reapply { self.reapply().await } else { Ok(0) }
        })
        .await
    }

    pub async fn delete_policy(&self, actor: &Actor, name: &str, reapply: bool) -> Result<u64, Error> {
        let event = Event::new("policy.delete").target(name).detail("reapply", reapply);
        self.audited(actor, event, async {
            self.catalog.delete_policy(name, false).await.map_err(|e| match e {
                CatalogError::NotFound => Error::NotFound(format!("no retention policy named {name:?}")),
                other => other.into(),
            })?;
            self.policies.reload(self.catalog.as_ref()).await?;
            tracing::info!(policy = %name, reapply, "retention policy deleted");
            if reapply { self.reapply().await } else { Ok(0) }
        })
        .await
    }

    async fn reapply(&self) -> Result<u64, Error> {
        let filter = crate::catalog::ListFilter::default();
        let mut after = None;
        let mut changed = 0;
        loop {
            let page = self.catalog.list_objects(&filter, after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(crate::catalog::PageCursor { created_at_ms: last.created_at_ms, object_id: last.object_id });
            for o in &page {
                // Derived items keep their source's retention.
                if o.derived_from.is_some() {
                    continue;
                }
                let retention = self.policies.assign(&o.spec, o.created_at_ms);
                if retention != o.retention {
                    self.catalog.set_retention(&o.object_id, &retention).await?;
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }

    // ---- legal holds ----

    pub async fn place_hold(
        &self,
        actor: &Actor,
        customer_id: CustomerId,
        interaction_id: Option<String>,
        case_ref: &str,
        reason: &str,
        placed_by: &str,
    ) -> Result<Hold, Error> {
        if let Some(i) = &interaction_id {
            check_text("interaction_id", i, crate::model::MAX_META_STRING)?;
        }
        let hold = Hold {
            hold_id: HoldId::new_random(),
            customer_id,
            interaction_id,
            case_ref: text("case_ref", case_ref, MAX_NAME)?,
            reason: text("reason", reason, MAX_REASON)?,
            placed_by: text("placed_by", placed_by, MAX_NAME)?,
            placed_at_ms: self.clock.now_ms(),
            released_by: None,
            released_at_ms: None,
        };
        let mut event = Event::new("hold.place").customer(&hold.customer_id).target(hold.hold_id);
        if let Some(i) = &hold.interaction_id {
            event = event.detail("interaction_id", i);
        }
        let hold = self.audited(actor, event, async { Ok(self.catalog.place_hold(&hold).await?) }).await?;
        tracing::info!(hold_id = %hold.hold_id, customer_id = %hold.customer_id, "legal hold placed");
        Ok(hold)
    }

    /// Releases a hold; pending shreds it was blocking proceed at once if
    /// due (expiry resumes at the next sweep).
    pub async fn release_hold(&self, actor: &Actor, id: &HoldId, by: &str) -> Result<Hold, Error> {
        let by = text("released_by", by, MAX_NAME)?;
        let hold = self
            .audited(actor, Event::new("hold.release").target(id), async {
                self.catalog.release_hold(id, &by, self.clock.now_ms()).await.map_err(|e| match e {
                    CatalogError::NotFound => Error::NotFound(format!("legal hold {id} not found")),
                    other => other.into(),
                })
            })
            .await?;
        tracing::info!(hold_id = %hold.hold_id, customer_id = %hold.customer_id, "legal hold released");
        if let Some(ticket) = self.catalog.shred_ticket(&hold.customer_id).await?
            && ticket.state == CustomerState::PendingShred
        {
            let _work = self.work.lock().await;
            if let Err(e) = self.advance_shred(actor, ticket).await {
                tracing::warn!(customer_id = %hold.customer_id, error = %e, "pending shred did not advance");
            }
        }
        Ok(hold)
    }

    pub async fn holds(&self, customer: Option<&CustomerId>, include_released: bool) -> Result<Vec<Hold>, Error> {
        Ok(self.catalog.holds(customer, include_released).await?)
    }

    // ---- the shred pipeline ----

    /// Requests a customer's shred. From now on their content is refused;
    /// the keys are destroyed when the grace window has passed (and a
    /// second person approved, if required). With no grace and no approval
    /// needed, the whole pipeline runs before this returns.
    pub async fn request_shred(
        &self,
        actor: &Actor,
        id: &CustomerId,
        reason: &str,
        requested_by: &str,
    ) -> Result<ShredStatus, Error> {
        let now = self.clock.now_ms();
        let request = ShredRequest {
            reason: text("reason", reason, MAX_REASON)?,
            requested_by: text("requested_by", requested_by, MAX_NAME)?,
            requested_at_ms: now,
            destroy_after_ms: now.saturating_add(self.cfg.shred_grace.as_millis() as i64),
            requires_approval: self.cfg.shred_requires_approval,
        };
        let event = Event::new("shred.request")
            .customer(id)
            .detail("requested_by", &request.requested_by)
            .detail("destroy_after", format_ms(request.destroy_after_ms));
        let ticket = self
            .audited(actor, event, async {
                self.catalog.request_shred(id, &request).await.map_err(|e| self.customer_error(id, e))
            })
            .await?;
        self.revocations.bump();
        let stopped = self.ingest.cancel_customer(&ticket.customer_ref);
        tracing::info!(
            customer_ref = %ticket.customer_ref,
            destroy_after = %format_ms(ticket.destroy_after_ms),
            requires_approval = ticket.requires_approval,
            streams_stopped = stopped,
            "shred requested"
        );
        crate::metrics::shred_requested();
        let _work = self.work.lock().await;
        // The sweep may have advanced (even completed) it while we waited.
        let ticket = self.catalog.shred_ticket(id).await?.unwrap_or(ticket);
        let ticket = self.advance_shred(actor, ticket).await?;
        self.status_of(id, Some(ticket)).await
    }

    /// The second person's approval under the two-person rule.
    pub async fn approve_shred(&self, actor: &Actor, id: &CustomerId, approver: &str) -> Result<ShredStatus, Error> {
        let approver = text("approver", approver, MAX_NAME)?;
        let event = Event::new("shred.approve").customer(id).detail("approver", &approver);
        let ticket = self
            .audited(actor, event, async {
                self.catalog
                    .approve_shred(id, &approver, self.clock.now_ms())
                    .await
                    .map_err(|e| self.customer_error(id, e))
            })
            .await?;
        tracing::info!(customer_ref = %ticket.customer_ref, "shred approved");
        let _work = self.work.lock().await;
        // The sweep may have advanced (even completed) it while we waited.
        let ticket = self.catalog.shred_ticket(id).await?.unwrap_or(ticket);
        let ticket = self.advance_shred(actor, ticket).await?;
        self.status_of(id, Some(ticket)).await
    }

    /// Cancels a pending shred; the customer's content is readable again.
    pub async fn cancel_shred(&self, actor: &Actor, id: &CustomerId) -> Result<ShredStatus, Error> {
        let _work = self.work.lock().await;
        let ticket = self
            .audited(actor, Event::new("shred.cancel").customer(id), async {
                self.catalog.cancel_shred(id).await.map_err(|e| self.customer_error(id, e))
            })
            .await?;
        tracing::info!(customer_ref = %ticket.customer_ref, "shred cancelled");
        self.status_of(id, Some(ticket)).await
    }

    pub async fn shred_status(&self, id: &CustomerId) -> Result<ShredStatus, Error> {
        let ticket = self.catalog.shred_ticket(id).await?;
        self.status_of(id, ticket).await
    }

    async fn status_of(&self, id: &CustomerId, ticket: Option<ShredTicket>) -> Result<ShredStatus, Error> {
        let customer = self
            .catalog
            .customer(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("customer {id} not found (nothing was ever stored for it)")))?;
        // The ticket was read before the customer: a shred that completed
        // in between (state and certificate are set by one commit) reads
        // as shredded without its certificate. Read it again then.
        let ticket = match ticket {
            Some(t) if customer.state == CustomerState::Shredded && t.certificate.is_none() => {
                self.catalog.shred_ticket(id).await?
            }
            other => other,
        };
        let blocking_holds = if customer.state == CustomerState::Shredded {
            Vec::new()
        } else {
            self.catalog.holds(Some(id), false).await?
        };
        Ok(ShredStatus { customer_id: id.clone(), state: customer.state, ticket, blocking_holds })
    }

    /// The signed certificate of a completed shred.
    pub async fn certificate(&self, id: &CustomerId) -> Result<String, Error> {
        let ticket = self.catalog.shred_ticket(id).await?;
        match ticket {
            Some(ShredTicket { certificate: Some(c), .. }) => Ok(c),
            Some(t) if t.state == CustomerState::PendingShred => Err(Error::Precondition(format!(
                "the shred of {id} has not completed yet (keys are destroyed after {})",
                format_ms(t.destroy_after_ms)
            ))),
            _ => match self.catalog.customer(id).await? {
                None => Err(Error::NotFound(format!("customer {id} not found"))),
                Some(_) => Err(Error::Precondition(format!("customer {id} has not been shredded"))),
            },
        }
    }

    fn customer_error(&self, id: &CustomerId, e: CatalogError) -> Error {
        match e {
            CatalogError::NotFound => {
                Error::NotFound(format!("customer {id} not found (nothing was ever stored for it)"))
            }
            CatalogError::CustomerState(CustomerState::Active) => {
                Error::Precondition(format!("customer {id} has no pending shred"))
            }
            other => other.into(),
        }
    }

    /// Takes a pending shred as far as it can go now. Caller holds `work`.
    async fn advance_shred(&self, actor: &Actor, mut ticket: ShredTicket) -> Result<ShredTicket, Error> {
        if ticket.state != CustomerState::PendingShred {
            return Ok(ticket);
        }
        let id = ticket.customer_id.clone();
        let mut canary_before = None;
        if ticket.destroyed.is_none() {
            let now = self.clock.now_ms();
            if now < ticket.destroy_after_ms || (ticket.requires_approval && ticket.approved_by.is_none()) {
                return Ok(ticket);
            }
            if !self.catalog.holds(Some(&id), false).await?.is_empty() {
                return Ok(ticket);
            }
            let customer = self.catalog.customer(&id).await?.ok_or_else(|| Error::internal("customer vanished"))?;
            // The check must be able to succeed for its failure later to
            // mean anything.
            canary_before = Some(self.keys.canary_opens(&customer).await?);
            let uploads: Vec<ObjectId> = self
                .catalog
                .unfinished_uploads(i64::MAX)
                .await?
                .into_iter()
                .filter(|u| u.customer_ref == ticket.customer_ref)
                .map(|u| u.object_id)
                .collect();
            // Fail closed: no record, no destruction (the sweep retries).
            self.audit.append(actor, Event::new("shred.destroy").customer(&id)).await?;
            ticket = match self.catalog.destroy_customer_keys(&id, now).await {
                Ok(t) => t,
                Err(CatalogError::Held(holds)) => {
                    tracing::info!(customer_ref = %ticket.customer_ref, holds = holds.len(), "shred waits for legal holds");
                    let _ = self
                        .audit
                        .append(actor, Event::new("shred.destroy").customer(&id).result("refused: held"))
                        .await;
                    return Ok(ticket);
                }
                Err(e) => {
                    let _ = self.audit.append(actor, Event::new("shred.destroy").customer(&id).result("failed")).await;
                    return Err(e.into());
                }
            };
            self.revocations.bump();
            self.ingest.cancel_customer(&ticket.customer_ref);
            tracing::info!(customer_ref = %ticket.customer_ref, "customer keys destroyed");
            fail::fail_point!("shred-after-destroy");
            for object_id in &uploads {
                let _ = self.store.delete(object_id).await;
            }
            let (dir, place) = (self.spool_dir.clone(), self.ingest.journal_place().clone());
            let failed = tokio::task::spawn_blocking(move || {
                uploads.iter().filter(|id| spool::remove_local(&place, &dir, id).is_err()).count()
            })
            .await
            .unwrap_or(0);
            if failed > 0 {
                // The orphan sweep retries these; the journals are sealed
                // under the customer key destroyed above, so they are
                // already unreadable.
                tracing::warn!(customer_ref = %ticket.customer_ref, failed, "some spool journals not removed yet");
            }
        }
        let leftovers = self.delete_ciphertext(self.catalog.tombstoned_objects(&ticket.customer_ref).await?).await;
        if leftovers > 0 {
            tracing::warn!(customer_ref = %ticket.customer_ref, leftovers, "some shredded ciphertext not deleted yet");
        }
        // Verify: no key version left, and the canary no longer opens
        // through the same path every read takes.
        let customer = self.catalog.customer(&id).await?.ok_or_else(|| Error::internal("customer vanished"))?;
        let remaining = self.catalog.customer_key_versions(&ticket.customer_ref).await?.len() as u32;
        let after = self.keys.canary_opens(&customer).await?;
        let passed = remaining == 0 && !after;
        let canary = CanaryCheck {
            unwrapped_before_destroy: canary_before,
            unwrapped_after_destroy: after,
            key_versions_remaining: remaining,
            result: if passed { "passed" } else { "failed" }.into(),
        };
        if !passed {
            let _ = self.audit.append(actor, Event::new("shred.verify").customer(&id).result("failed")).await;
            return Err(Error::Internal(format!(
                "shred verification of customer_ref {} failed ({remaining} key versions remain, canary opens: {after}); \
                 the customer stays pending",
                ticket.customer_ref
            )));
        }
        let destroyed = ticket.destroyed.clone().ok_or_else(|| Error::internal("destroy step not recorded"))?;
        // One shred.complete record per customer, even across crashes; the
        // certificate names exactly that record (other requests may append
        // records meanwhile), and a signed checkpoint then covers it.
        let audit_head = match self.audit.find("shred.complete", &id).await? {
            Some(head) => head,
            None => {
                let event = Event::new("shred.complete")
                    .customer(&id)
                    .detail("objects", destroyed.objects)
                    .detail("key_versions", &destroyed.key_versions)
                    .detail("objects_digest_sha256", hex::encode(destroyed.objects_digest));
                self.audit.append(actor, event).await?
            }
        };
        self.audit.checkpoint().await?;
        let cert = ShredCertificate {
            format: ShredCertificate::format_v1(),
            customer_id: id.to_string(),
            customer_ref: ticket.customer_ref.to_string(),
            reason: ticket.reason.clone(),
            key_versions_destroyed: destroyed.key_versions.clone(),
            root_key_ids: destroyed.root_key_ids.clone(),
            objects_unrecoverable: destroyed.objects,
            objects_digest_sha256: hex::encode(destroyed.objects_digest),
            uploads_discarded: destroyed.uploads,
            requested_by: ticket.requested_by.clone(),
            requested_at: format_ms(ticket.requested_at_ms),
            approved_by: ticket.approved_by.clone(),
            approved_at: ticket.approved_at_ms.map(format_ms),
            destroyed_at: format_ms(destroyed.at_ms),
            canary,
            audit_log_head: Some(audit_head.to_string()),
            issued_at: format_ms(self.clock.now_ms()),
            signing_key_id: String::new(),
        };
        let signed = self.signer.sign(cert);
        let json = serde_json::to_string_pretty(&signed).map_err(Error::internal)?;
        let ticket = self.catalog.complete_shred(&id, &json, self.clock.now_ms()).await?;
        self.revocations.bump();
        tracing::info!(
            customer_ref = %ticket.customer_ref,
            objects = destroyed.objects,
            key_versions = destroyed.key_versions.len(),
            "customer shredded and verified"
        );
        crate::metrics::shred_completed();
        Ok(ticket)
    }

    async fn delete_ciphertext(&self, ids: Vec<ObjectId>) -> u64 {
        let mut leftovers = 0;
        for object_id in ids {
            if let Err(e) = self.store.delete(&object_id).await {
                tracing::warn!(%object_id, error = %e, "erased object's ciphertext not deleted");
                leftovers += 1;
            }
        }
        leftovers
    }

    // ---- the sweep ----

    /// One retention sweep: expire due objects, advance pending shreds,
    /// discard abandoned uploads and orphaned journals. A dry run changes
    /// nothing and reports what would be done.
    pub async fn sweep(&self, actor: &Actor, dry_run: bool) -> Result<SweepReport, Error> {
        let result = self.sweep_once(actor, dry_run).await;
        match &result {
            Ok(report) if !dry_run => crate::metrics::sweep(report),
            Ok(_) => {}
            Err(_) => crate::metrics::sweep_failed(),
        }
        result
    }

    async fn sweep_once(&self, actor: &Actor, dry_run: bool) -> Result<SweepReport, Error> {
        let _work = self.work.lock().await;
        // Among replicas sharing the catalog, one sweeps at a time; a dry
        // run changes nothing and needs no lock.
        let _sweeping = match dry_run {
            true => None,
            false => Some(self.catalog.try_sweep_lock().await?.ok_or_else(|| {
                Error::Busy(
                    "another replica is running the retention sweep now; it does the same work, so there is \
                     nothing to retry unless it fails (see its log)"
                        .into(),
                )
            })?),
        };
        // Tests hold a replica inside its sweep (`sweep-locked=sleep(ms)`).
        #[cfg(feature = "failpoints")]
        tokio::task::spawn_blocking(|| fail::fail_point!("sweep-locked")).await.map_err(Error::internal)?;
        let now = self.clock.now_ms();
        let mut report = SweepReport { dry_run, ..Default::default() };
        let count = self.catalog.count_expiring(now).await?;
        report.objects_held = count.held;
        let ttl_ms = self.cfg.abandoned_upload_ttl.as_millis() as i64;
        let abandoned: Vec<_> = self
            .catalog
            .unfinished_uploads(now.saturating_sub(ttl_ms))
            .await?
            .into_iter()
            .filter(|u| !self.ingest.is_streaming(&u.upload_id))
            .collect();
        let pending = self.catalog.pending_shreds().await?;
        if dry_run {
            report.objects_expired = count.due - count.held;
            for t in &pending {
                let due = t.destroyed.is_some()
                    || (now >= t.destroy_after_ms
                        && (!t.requires_approval || t.approved_by.is_some())
                        && self.catalog.holds(Some(&t.customer_id), false).await?.is_empty());
                if due {
                    report.shreds_completed += 1;
                } else {
                    report.shreds_waiting += 1;
                }
            }
            report.uploads_abandoned = abandoned.len() as u64;
            report.orphan_journals_removed = self.orphan_journals().await?.len() as u64;
            return Ok(report);
        }

        if count.due > count.held {
            // Fail closed: the sweep's record comes first; each erased
            // object gets its own record right after its batch.
            self.audit.append(actor, Event::new("retention.expire").detail("due", count.due - count.held)).await?;
        }
        loop {
            let expired = self.catalog.expire_objects(now, EXPIRY_BATCH).await?;
            if expired.is_empty() {
                break;
            }
            // Crash tests stop here: data keys scrubbed, ciphertext not yet
            // deleted (`expire-after-scrub=panic`).
            fail::fail_point!("expire-after-scrub");
            self.revocations.bump();
            for e in &expired {
                let event = Event::new("object.expire").customer(&e.customer_id).target(e.object_id);
                self.audit.append(actor, event).await?;
            }
            report.objects_expired += expired.len() as u64;
            report.leftovers += self.delete_ciphertext(expired.iter().map(|e| e.object_id).collect()).await;
            tracing::info!(objects = expired.len(), "expired objects crypto-erased");
        }
        for ticket in pending {
            let customer_ref = ticket.customer_ref;
            match self.advance_shred(actor, ticket).await {
                Ok(t) if t.state == CustomerState::Shredded => report.shreds_completed += 1,
                Ok(_) => report.shreds_waiting += 1,
                Err(e) => {
                    tracing::error!(%customer_ref, error = %e, "pending shred failed; retried at the next sweep");
                    report.shreds_waiting += 1;
                }
            }
        }
        for upload in abandoned {
            // What was received of it is about to be destroyed: recorded
            // first, like an expiry (no record, no discard).
            let event = Event::new("upload.discard")
                .customer(&upload.spec.customer_id)
                .target(upload.object_id)
                .detail("upload_id", upload.upload_id.to_string());
            self.audit.append(actor, event).await?;
            self.catalog.discard_upload(&upload.upload_id).await?;
            report.leftovers += self.delete_ciphertext(vec![upload.object_id]).await;
            let (dir, id, place) = (self.spool_dir.clone(), upload.object_id, self.ingest.journal_place().clone());
            if tokio::task::spawn_blocking(move || spool::remove_local(&place, &dir, &id))
                .await
                .map_err(Error::internal)?
                .is_err()
            {
                report.leftovers += 1;
            }
            report.uploads_abandoned += 1;
            tracing::info!(upload_id = %upload.upload_id, "abandoned upload discarded");
        }
        for path in self.orphan_journals().await? {
            match std::fs::remove_file(&path) {
                Ok(()) => report.orphan_journals_removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => report.leftovers += 1,
            }
        }
        if report != (SweepReport { dry_run, ..Default::default() }) {
            tracing::info!(
                expired = report.objects_expired,
                held = report.objects_held,
                shreds_completed = report.shreds_completed,
                shreds_waiting = report.shreds_waiting,
                uploads_abandoned = report.uploads_abandoned,
                orphan_journals = report.orphan_journals_removed,
                leftovers = report.leftovers,
                "retention sweep"
            );
        }
        Ok(report)
    }

    /// Journals with no unfinished upload behind them (left by a crash
    /// between commit and journal removal, or by a shred).
    async fn orphan_journals(&self) -> Result<Vec<PathBuf>, Error> {
        // List the directory first: a journal is only ever created after
        // its upload's catalog row, so one listed here whose row is not
        // unfinished afterwards is garbage.
        let dir = self.spool_dir.clone();
        let files = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<(PathBuf, String)>> {
            let mut out = Vec::new();
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                if let Some(stem) = path.file_name().and_then(|n| n.to_str()).and_then(spool::spool_file_id) {
                    out.push((path.clone(), stem.to_owned()));
                }
            }
            Ok(out)
        })
        .await
        .map_err(Error::internal)?
        .map_err(Error::internal)?;
        let live: HashSet<ObjectId> =
            self.catalog.unfinished_uploads(i64::MAX).await?.into_iter().map(|u| u.object_id).collect();
        Ok(files
            .into_iter()
            .filter(|(_, stem)| ObjectId::parse(stem).map(|id| !live.contains(&id)).unwrap_or(true))
            .map(|(path, _)| path)
            .collect())
    }

    /// Deletes ciphertext left by expiries that crashed before deleting
    /// it. Run once at start-up.
    pub async fn vacuum_expired(&self) -> Result<u64, Error> {
        let mut after = None;
        let mut leftovers = 0;
        loop {
            let ids = self.catalog.expired_objects(after, 1000).await?;
            let Some(last) = ids.last().copied() else { break };
            after = Some(last);
            leftovers += self.delete_ciphertext(ids).await;
        }
        Ok(leftovers)
    }
}
