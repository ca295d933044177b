"""The playground page's scripts around sending a question: the box empties as it is sent; Clear drops a held one.

Gradio reads a chat turn's inputs in the page when the question is sent, and the turn may then wait in its queue
behind other users' turns. A question sent while the page's own turn waits or streams is held back by the page
(``trigger_mode="always_last"``) and sent, with the box as it is then, when that turn ends.
"""

from __future__ import annotations

#: the message box's element id (``gr.Textbox(elem_id=...)``)
INPUT_ID = "xllm-input"
#: the Send and Clear buttons' element ids
SEND_ID = "xllm-send"
CLEAR_ID = "xllm-clear"

#: runs as the page loads (a load event's ``js``): notes when the user last sent a question (Enter in the box, Send)
#: and last pressed Clear; a held question is sent by the page, not by a press, so only these tell the two apart.
#: Enter counts on keypress, the event Gradio's box sends on: no browser fires it for the Enter that ends an input
#: method's composition, while Safari's keydown for that Enter has ``isComposing`` false (a keydown listener took it
#: for a send press, and a held question a Clear had dropped was sent after all, with the half-typed box)
PRESSES_JS = """() => {
  if (window.xllmPresses) return [];
  const presses = window.xllmPresses = {sent: 0, cleared: 0};
  const on = (target, id) => target instanceof Element && target.closest("#" + id) !== null;
  document.addEventListener("keypress", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && on(e.target, "%(input)s")) presses.sent = performance.now();
  }, true);
  document.addEventListener("click", (e) => {
    if (on(e.target, "%(send)s")) presses.sent = performance.now();
    if (on(e.target, "%(clear)s")) presses.cleared = performance.now();
  }, true);
  return [];
}""" % {"input": INPUT_ID, "send": SEND_ID, "clear": CLEAR_ID}

#: runs in the page as a question is sent, once Gradio has read the inputs (before the turn waits in the queue):
#: empties the box there and then. Emptied by the turn's first update instead, it was emptied when the turn
#: started, wiping what the user had typed while it waited behind other users' turns. A held question that a
#: Clear since has dropped (Clear emptied the box it was kept in) is sent empty, which asks nothing, and the box,
#: holding what the user has typed since and not sent, is left alone.
SENT_JS = """(message, ...rest) => {
  const presses = window.xllmPresses;
  if (presses && presses.cleared > presses.sent) return ["", ...rest];
  const box = document.querySelector("#%(input)s textarea");
  if (box) { box.value = ""; box.dispatchEvent(new Event("input", {bubbles: true})); }
  return [message, ...rest];
}""" % {"input": INPUT_ID}
