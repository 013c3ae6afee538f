//! `getallcont`: one page of containers by name, and the data deleted containers left behind.

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
    let data = ctx
        .store
        .leftovers()
        .await?
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
    });
    Ok(Outcome::new(Op::Getallcont, Some(result), Change::Nothing))
}
