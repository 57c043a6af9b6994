use mars_state::{FileStorageBackend, StateManager};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};
fn main() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = "/work/main/target/prof-data";
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .read(true)
        .open(format!("{dir}/pre.log"))
        .unwrap();
    f.write_all_at(&vec![0u8; 4 << 20], 0).unwrap();
    f.sync_all().unwrap();
    let buf = vec![7u8; 1268];
    let budget = Duration::from_millis(1000);
    rt.block_on(async {
        let backend = FileStorageBackend::options()
            .write_ahead_log(true)
            .open(format!("{dir}/store"))
            .unwrap();
        let m = StateManager::builder(backend).start().await.unwrap();
        let state = serde_json::json!({"step": 0, "pad": "x".repeat(1000)});
        for _ in 0..200 {
            m.save_session("one", &state).await.unwrap();
        }
        if std::env::var_os("ONLY").is_some() {
            let t = Instant::now();
            for _ in 0..5000 {
                m.save_session("one", &state).await.unwrap();
            }
            println!("{:.0}/s", 5000.0 / t.elapsed().as_secs_f64());
            m.shutdown().await.unwrap();
            return;
        }
        let mut ratios = vec![];
        for _ in 0..5 {
            let t = Instant::now();
            let mut n = 0u64;
            let mut at = 0u64;
            while t.elapsed() < budget {
                f.write_all_at(&buf, at).unwrap();
                f.sync_data().unwrap();
                at = (at + 1268) % (4 << 20 - 2000);
                n += 1;
            }
            let raw = n as f64 / t.elapsed().as_secs_f64();
            let (m2, st2) = (m.clone(), state.clone());
            let task = async move {
                let t = Instant::now();
                let mut n = 0u64;
                while t.elapsed() < budget {
                    m2.save_session("one", &st2).await.unwrap();
                    n += 1;
                }
                n as f64 / t.elapsed().as_secs_f64()
            };
            let ours = if std::env::var_os("TASK").is_some() {
                tokio::spawn(task).await.unwrap()
            } else {
                task.await
            };
            println!("raw {raw:.0}/s ours {ours:.0}/s ratio {:.2}", ours / raw);
            ratios.push(ours / raw);
        }
        ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("median ratio {:.2}", ratios[2]);
        m.shutdown().await.unwrap();
    });
}
