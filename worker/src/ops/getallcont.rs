//! `getallcont`: one page of the containers by name, followed by the data deleted containers
//! left behind, at most `page_size` records in all. In a fleet, the host that takes it asks
//! every host for its first pages ([`first_records`]) and cuts the page from the merged lists
//! ([`cut`]); this host's own page is [`execute`].

use schemas::{ContainerPage, ContainerRecord, LeftoverData, Op, PageRequest, ReplyResult};

use super::{record, OpContext, OpError, Outcome};
use crate::store::{Change, Store, StoreError};

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// The page and page size a request asks for, or 400.
pub fn page_of(req: &PageRequest) -> Result<(u32, u32), OpError> {
    let page = req.page.unwrap_or(1);
    let page_size = req.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
    if page == 0 || page_size == 0 || page_size > MAX_PAGE_SIZE {
        return Err(OpError::bad_request(format!(
            "page counts from 1 and page_size is 1 to {MAX_PAGE_SIZE}"
        )));
    }
    Ok((page, page_size))
}

pub async fn execute(ctx: &OpContext, req: &PageRequest) -> Result<Outcome, OpError> {
    let (page, page_size) = page_of(req)?;
    let result = ReplyResult::Page(page_from(&ctx.store, page, page_size).await?);
    Ok(Outcome::new(Op::Getallcont, Some(result), Change::Nothing))
}

/// The first `limit` records of this host (containers, then data): everything a fleet-wide
/// page ending at record `limit` can take from it.
pub async fn first_records(store: &Store, limit: u32) -> Result<ContainerPage, StoreError> {
    page_from(store, 1, limit).await
}

async fn page_from(store: &Store, page: u32, page_size: u32) -> Result<ContainerPage, StoreError> {
    let (rows, total) = store.containers_page(page, page_size).await?;
    // The data of deleted containers follows the containers: this page's share of it starts
    // where the containers ran out, and fills only the room they left.
    let first = u64::from(page - 1) * u64::from(page_size);
    let room = page_size - u32::try_from(rows.len()).unwrap_or(page_size);
    let (left, data_total) = store
        .leftovers_page(first.saturating_sub(total), room)
        .await?;
    let data = left
        .into_iter()
        .map(|left| LeftoverData {
            container_name: left.name,
            container_image: left.image,
            node: None,
        })
        .collect();
    Ok(ContainerPage {
        containers: rows.iter().map(record).collect(),
        data,
        page,
        page_size,
        total,
        data_total,
    })
}

/// Cuts page `page` from complete lists: `containers` and `data` hold, sorted by name, at
/// least the first `page * page_size` records of each kind (more are ignored), and the totals
/// count all of them.
pub fn cut(
    containers: Vec<ContainerRecord>,
    data: Vec<LeftoverData>,
    (total, data_total): (u64, u64),
    page: u32,
    page_size: u32,
) -> ContainerPage {
    let first = u64::from(page - 1) * u64::from(page_size);
    let skip = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let containers: Vec<_> = containers
        .into_iter()
        .skip(skip(first))
        .take(page_size as usize)
        .collect();
    let room = page_size as usize - containers.len();
    let data = data
        .into_iter()
        .skip(skip(first.saturating_sub(total)))
        .take(room)
        .collect();
    ContainerPage {
        containers,
        data,
        page,
        page_size,
        total,
        data_total,
    }
}
