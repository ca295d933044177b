"""The playground page's link guard: in the transcript, only web and mail links stay links.

Behind jupyter-server-proxy the page lives under the user's Jupyter server, so a relative link in a
reply (``[x](../../api/contents/secret)``, raw ``<a href>``, a reference link) opened a file of the
user's when clicked. %%xllm and the ChatWidget render model text themselves and spell no such link;
here Gradio renders it, and the transcript's value is also the history each turn sends back as
context, which must stay as the model wrote it. So the guard works on what the page shows: every
element Gradio draws in the transcript is vetted as it appears (a MutationObserver runs before the
browser handles any click), and one that would navigate anywhere but ``http(s)://`` or ``mailto:``
loses its target, which is shown after its text instead; so does an absolute one to the page's own
origin (behind the proxy, the user's Jupyter server: a hub's URLs are easy to guess). Clicks and form
submits that reach such an element anyway are cancelled. The copy buttons still copy the text as written.
"""

from __future__ import annotations

#: the transcript's element id (``gr.Chatbot(elem_id=...)``): the guard covers what is inside it
TRANSCRIPT_ID = "xllm-chatbot"

_SCRIPT = """
(() => {
  const WEB = /^(https?:\\/\\/|mailto:)/i;
  // a web link to another site; the page's own origin is the user's Jupyter server, spelt out or not
  const elsewhere = (target) => {
    const text = target.trim();
    if (!WEB.test(text)) return false;
    try { return new URL(text).origin !== location.origin; } catch (e) { return false; }
  };
  const NAV = ["href", "xlink:href", "action", "formaction"];
  const inside = (el) => el instanceof Element && el.closest("#%(id)s");
  const vet = (el) => {
    for (const name of NAV) {
      const target = el.getAttribute(name);
      if (target === null) continue;
      if (name === "href" && el.localName === "a" && elsewhere(target)) continue;
      el.removeAttribute(name);
      if (name === "href" || name === "xlink:href") {
        el.removeAttribute("target");
        el.setAttribute("data-xllm-href", target);
        el.append(" (" + target + ")");
      }
    }
  };
  const sweep = (root) => {
    if (!(root instanceof Element)) return;
    if (inside(root)) vet(root);
    for (const el of root.querySelectorAll("[href], [action], [formaction]")) if (inside(el)) vet(el);
    for (const el of root.querySelectorAll("*")) if (el.hasAttribute("xlink:href") && inside(el)) vet(el);
  };
  new MutationObserver((changes) => {
    for (const change of changes) {
      if (change.type === "attributes") sweep(change.target);
      else for (const node of change.addedNodes) sweep(node.nodeType === 3 ? node.parentElement : node);
    }
  }).observe(document, {subtree: true, childList: true, attributes: true,
                        attributeFilter: NAV});
  const stop = (event) => {
    const el = event.target instanceof Element ? event.target : null;
    if (!el || !inside(el)) return;
    const link = el.closest("[href], [action], [formaction], form");
    if (!link) return;
    const href = link.getAttribute("href");
    if (event.type !== "submit" && link.localName === "a" && href !== null && elsewhere(href)) return;
    event.preventDefault();
  };
  for (const type of ["click", "auxclick", "submit"]) document.addEventListener(type, stop, true);
})();
"""

#: the ``<head>`` HTML that installs the guard (``gradio.mount_gradio_app(head=...)``)
LINK_GUARD_HEAD = "<script>" + _SCRIPT % {"id": TRANSCRIPT_ID} + "</script>"
