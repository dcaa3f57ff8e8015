//! Change control on assets against a real cluster.

use dalp_assets::types::{AssetInput, BaseType};
use dalp_assets::{AssetError, AssetStore};
use dalp_audit::RequestContext;
use dalp_db::Component;
use dalp_testkit::migrated_database;
use uuid::Uuid;

/// The schemas these tests need: their own and the audit trail every write records into.
const SCHEMAS: [dalp_db::MigrationSet; 2] = [dalp_assets::MIGRATIONS, dalp_audit::MIGRATIONS];

fn input(isin: &str) -> AssetInput {
    AssetInput {
        organisation_id: Uuid::new_v4(),
        name: "Green Bond 2030".into(),
        symbol: "GB30".into(),
        decimals: 6,
        base_type: BaseType::Bond,
        isin: Some(isin.into()),
        country_numeric: Some(442),
        chain_id: Some(1),
        contract_address: Some("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed".into()),
        template_id: None,
        metadata: None,
        details: Some(
            serde_json::json!({ "face_value": "1000", "maturity_date": "2030-12-31", "denomination_asset": "EUR" }),
        ),
    }
}

fn ctx(who: &str, req: &str) -> RequestContext {
    RequestContext {
        actor: who.into(),
        request_id: Some(req.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_change_leaves_a_version_and_an_audit_record() {
    let db = migrated_database(&SCHEMAS).await;
    let store = AssetStore::new(db.pools().get(Component::Assets).clone());
    let a = store
        .create(
            &ctx("user:alice", "r1"),
            &input("US0378331005").parse().unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(a.version, 1);
    assert_eq!(
        a.contract_address.as_deref(),
        Some("0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed")
    );
    let mut changed = input("US0378331005");
    changed.name = "Green Bond 2031".into();
    let b = store
        .update(&ctx("user:bob", "r2"), a.id, 1, &changed.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(b.version, 2);
    store
        .delete(&ctx("user:carol", "r3"), a.id, 2)
        .await
        .unwrap();
    assert!(matches!(
        store.get(a.id).await,
        Err(AssetError::NotFound("asset"))
    ));

    let h = store.history(a.id).await.unwrap();
    let ops: Vec<(&str, &str)> = h
        .iter()
        .map(|v| (v.operation.as_str(), v.changed_by.as_str()))
        .collect();
    assert_eq!(
        ops,
        [
            ("insert", "user:alice"),
            ("update", "user:bob"),
            ("delete", "user:carol")
        ]
    );
    assert_eq!(h[1].before.as_ref().unwrap()["name"], "Green Bond 2030");
    assert_eq!(h[1].after.as_ref().unwrap()["name"], "Green Bond 2031");
    assert!(h[2].after.is_none() && h[2].before.is_some());

    let su = db.superuser().await;
    let audit: Vec<(String, String, String)> = su
        .query(
            "SELECT action, actor, request_id FROM dalp_audit.events WHERE resource_type = 'asset' AND resource_id = $1 ORDER BY id",
            &[&a.id.to_string()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        audit,
        [
            (
                "assets.asset.create".to_string(),
                "user:alice".to_string(),
                "r1".to_string()
            ),
            (
                "assets.asset.update".to_string(),
                "user:bob".to_string(),
                "r2".to_string()
            ),
            (
                "assets.asset.delete".to_string(),
                "user:carol".to_string(),
                "r3".to_string()
            ),
        ]
    );
}

#[tokio::test]
async fn of_two_concurrent_updates_exactly_one_wins() {
    let db = migrated_database(&SCHEMAS).await;
    let pools = db.pools();
    let store = AssetStore::new(pools.get(Component::Assets).clone());
    let a = store
        .create(&ctx("user:a", "c"), &input("DE000BAY0017").parse().unwrap())
        .await
        .unwrap();
    let mut one = input("DE000BAY0017");
    one.name = "First".into();
    let mut two = input("DE000BAY0017");
    two.name = "Second".into();
    let (s1, s2) = (store.clone(), store.clone());
    let (spec1, spec2) = (one.parse().unwrap(), two.parse().unwrap());
    let (c1, c2) = (ctx("user:x", "u1"), ctx("user:y", "u2"));
    let (r1, r2) = tokio::join!(
        s1.update(&c1, a.id, 1, &spec1),
        s2.update(&c2, a.id, 1, &spec2)
    );
    let wins = [&r1, &r2].iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{r1:?} {r2:?}");
    let loser = match (r1, r2) {
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => e,
        other => panic!("expected one winner: {other:?}"),
    };
    assert!(
        matches!(
            loser,
            AssetError::Conflict {
                expected: 1,
                current: 2,
                ..
            }
        ),
        "{loser}"
    );
    assert_eq!(
        store.history(a.id).await.unwrap().len(),
        2,
        "the loser left no version"
    );
    // A stale delete changes nothing either.
    assert!(matches!(
        store.delete(&ctx("user:z", "d"), a.id, 1).await,
        Err(AssetError::Conflict { .. })
    ));
    assert_eq!(store.get(a.id).await.unwrap().version, 2);
}

#[tokio::test]
async fn duplicates_and_history_edits_are_refused() {
    let db = migrated_database(&SCHEMAS).await;
    let store = AssetStore::new(db.pools().get(Component::Assets).clone());
    let a = store
        .create(&ctx("user:a", "x"), &input("AU0000XVGZA3").parse().unwrap())
        .await
        .unwrap();
    let err = store
        .create(&ctx("user:a", "y"), &input("AU0000XVGZA3").parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, AssetError::Duplicate(_)), "{err}");
    let svc = db.connect_as(Component::Assets).await;
    for sql in [
        "UPDATE dalp_assets.asset_versions SET changed_by = 'x'",
        "DELETE FROM dalp_assets.asset_versions",
    ] {
        let e = svc.batch_execute(sql).await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}"
        );
    }
    let n: i64 = db
        .superuser()
        .await
        .query_one(
            "SELECT count(*) FROM dalp_assets.asset_versions WHERE asset_id = $1",
            &[&a.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// The uniqueness constraints `AssetError::Duplicate` names by their constraint exist under
/// those names (a renamed constraint would silently fall back to a vague message).
#[tokio::test]
async fn duplicate_messages_name_constraints_that_exist() {
    let db = migrated_database(&SCHEMAS).await;
    let su = db.superuser().await;
    for name in [
        "assets_isin_key",
        "assets_contract_unique",
        "templates_organisation_id_slug_key",
        "fx_rates_pkey",
    ] {
        let n: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
                  WHERE n.nspname = 'dalp_assets' AND c.conname = $1 AND c.contype IN ('u', 'p')",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "constraint {name}");
    }
}
