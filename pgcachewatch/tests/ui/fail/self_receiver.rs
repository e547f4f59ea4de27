struct Repo;

impl Repo {
    #[pgcachewatch::cached]
    async fn name(&self, id: u32) -> String {
        id.to_string()
    }
}

fn main() {}
