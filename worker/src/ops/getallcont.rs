//! `getallcont`: one page of the containers by name, followed by the data deleted containers
//! left behind, at most `page_size` records in all.

use schemas::{ContainerPage, LeftoverData, Op, PageRequest, ReplyResult};

use super::{record, OpContext, OpError, Outcome};
use crate::store::Change;

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 1000;

pub async fn execute(ctx: &OpContext, req: &PageRequest) -> Result<Outcome, OpError> {
    let page = req.page.unwrap_or(1);
    let page_size = req.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
    if page == 0 || page_size == 0 || page_size > MAX_PAGE_SIZE {
        return Err(OpError::bad_request(format!(
            "page counts from 1 and page_size is 1 to {MAX_PAGE_SIZE}"
        )));
    }
    let (rows, total) = ctx.store.containers_page(page, page_size).await?;
    // The data of deleted containers follows the containers: this page's share of it starts
    // where the containers ran out, and fills only the room they left.
    let first = u64::from(page - 1) * u64::from(page_size);
    let room = page_size - u32::try_from(rows.len()).unwrap_or(page_size);
    let (left, data_total) = ctx
        .store
        .leftovers_page(first.saturating_sub(total), room)
        .await?;
    let data = left
        .into_iter()
        .map(|left| LeftoverData {
            container_name: left.name,
            container_image: left.image,
        })
        .collect();
    let result = ReplyResult::Page(ContainerPage {
        containers: rows.iter().map(record).collect(),
        data,
        page,
        page_size,
        total,
        data_total,
    });
    Ok(Outcome::new(Op::Getallcont, Some(result), Change::Nothing))
}
