// genauth-monitor web view: the one script, optional. It only adds the copy buttons (shown
// when this runs); every page works without it.
"use strict";

function copyText(element) {
  const text = element.textContent;
  if (navigator.clipboard && window.isSecureContext) {
    return navigator.clipboard.writeText(text);
  }
  const range = document.createRange();
  range.selectNodeContents(element);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
  document.execCommand("copy");
  return Promise.resolve();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    const source = document.getElementById(button.dataset.copy);
    if (!source) continue;
    button.hidden = false;
    button.addEventListener("click", () => {
      copyText(source).then(
        () => { button.textContent = "Copied"; },
        () => { button.textContent = "Select the text to copy"; },
      );
    });
  }
});
