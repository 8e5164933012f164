// The queue and history screen: every job newest first, with a status filter and older pages on demand; new
// jobs appear at the top as they are submitted.

import { JobCard } from "./card.js";
import * as store from "./store.js";

export class QueueView {
  constructor(root, { useFrame }) {
    this.root = root;
    this.useFrame = useFrame;
    this.list = root.querySelector("#jobs");
    this.more = root.querySelector("#queue-more");
    this.filter = root.querySelector("#queue-filter");
    this.message = root.querySelector("#queue-message");
    this.cards = new Map(); // id -> JobCard
    this.lastId = "";
    this.filter.addEventListener("change", () => this.reload());
    root.querySelector("#queue-refresh").addEventListener("click", () => this.reload());
    this.more.addEventListener("click", () => this.load(true));
    store.onSubmitted((job) => this.add(job));
    store.onAnyChange((job) => {
      if (job.deleted) this.cards.delete(job.id);
      this.updateCount();
    });
  }

  // The first time the screen is shown, and on Refresh or a filter change.
  async reload() {
    for (const card of this.cards.values()) card.destroy();
    this.cards.clear();
    this.lastId = "";
    await this.load(false);
  }

  // The first time: the list (once, however often the screen is shown while it loads).
  show() {
    this.first ??= this.reload();
    return this.first;
  }

  async load(older) {
    this.message.hidden = true;
    try {
      const page = await store.list({ status: this.filter.value, after: older ? this.lastId : "" });
      for (const job of page.data) this.place(job, false);
      this.lastId = page.last_id || this.lastId;
      this.more.hidden = !page.has_more;
    } catch (err) {
      this.message.textContent = `The job list could not be loaded: ${err.message}`;
      this.message.hidden = false;
    }
  }

  // A job submitted on this page: on top of the list (the filter is reset to show it).
  add(job) {
    if (this.filter.value && this.filter.value !== job.status) this.filter.value = "";
    return this.place(job, true);
  }

  place(job, onTop) {
    let card = this.cards.get(job.id);
    if (!card) {
      card = new JobCard(job, { useFrame: this.useFrame });
      this.cards.set(job.id, card);
      if (onTop) this.list.prepend(card.el);
      else this.list.append(card.el);
    }
    return card;
  }

  updateCount() {
    const live = [...this.cards.keys()].map(store.get).filter((j) => j && !store.TERMINAL.has(j.status));
    const badge = document.getElementById("queue-count");
    badge.textContent = live.length ? `(${live.length} running or waiting)` : "";
  }
}
