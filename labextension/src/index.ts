/**
 * The JupyterLab plugin: the xllm side panel, and commands to open the Gradio
 * playground or a chat in the main area (palette entries under "xllm").
 */

import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { Dialog, ICommandPalette, MainAreaWidget, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { LabIcon } from '@jupyterlab/ui-components';

import { XllmApi, XllmApiError } from './api';
import { ChatView } from './chat';
import { ChatModelSync } from './chatmodels';
import { jupyterRequest } from './connection';
import { XllmPanel } from './panel';

/** Command ids. */
export namespace CommandIDs {
  export const openPlayground = 'xllm:open-playground';
  export const openChat = 'xllm:open-chat';
  export const showPanel = 'xllm:show-panel';
}

const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
<g class="jp-icon3" fill="#616161"><path d="M4 5h16v2H4zM4 11h10v2H4zM4 17h16v2H4z"/><circle cx="19" cy="12" r="2"/></g></svg>`;

export const xllmIcon = new LabIcon({ name: 'xllm:icon', svgstr: ICON_SVG });

let chatCount = 0;

/** A chat in the main area: the fallback when the playground cannot be opened. */
function openChat(app: JupyterFrontEnd, api: XllmApi, model: string | null): void {
  // the models the server lists change while the chat is open (pulls, creates, loads): read
  // them on open, when the chat gets focus and every 30 s while it is shown
  let sync: ChatModelSync | null = null;
  const chat = new ChatView({
    api,
    className: 'xllm-mod-main',
    onModelGone: () => void sync?.refresh(),
    onVisible: visible => {
      if (visible) {
        void sync?.refreshIfStale();
        sync?.start();
      } else {
        sync?.stop();
      }
    }
  });
  sync = new ChatModelSync(() => api.models(), chat, model);
  void sync.refresh();
  sync.start();
  chat.node.addEventListener('focusin', () => void sync?.refreshIfStale());
  const widget = new MainAreaWidget({ content: chat });
  widget.id = `xllm-chat-${++chatCount}`;
  widget.title.label = 'xllm chat';
  widget.title.icon = xllmIcon;
  widget.title.closable = true;
  widget.disposed.connect(() => sync?.stop());
  app.shell.add(widget, 'main');
  app.shell.activateById(widget.id);
}

/** Ask the server for the playground and open it in a new browser tab; a main-area chat if that fails. */
async function openPlayground(app: JupyterFrontEnd, api: XllmApi, panel: XllmPanel): Promise<void> {
  // open the tab now, inside the click, so popup blockers allow it; point it at the URL later
  const tab = window.open('', '_blank');
  try {
    const url = await api.playground();
    const absolute = new URL(url, window.location.href).href;
    if (tab) {
      tab.location.href = absolute;
    } else {
      window.open(absolute, '_blank');
    }
  } catch (error) {
    tab?.close();
    openChat(app, api, panel.chat.model);
    const why = error instanceof XllmApiError ? error.message : String(error);
    void showErrorMessage('xllm playground', `The playground could not be opened (${why}). A chat opened in the main area instead.`);
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: '@xllm/jupyterlab:plugin',
  description: 'Side panel for the shared xllm engine: status, models, memory, tok/s and a quick chat.',
  autoStart: true,
  optional: [ICommandPalette],
  activate: (app: JupyterFrontEnd, palette: ICommandPalette | null) => {
    const api = new XllmApi(jupyterRequest(app.serviceManager.serverSettings));
    const panel = new XllmPanel({
      api,
      openPlayground: () => void app.commands.execute(CommandIDs.openPlayground),
      confirm: async (title, question) =>
        (await showDialog({ title, body: question, buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Unload' })] })).button.accept
    });
    panel.title.icon = xllmIcon;
    panel.title.caption = 'xllm: shared LLM engine';
    app.shell.add(panel, 'left', { rank: 900 });

    app.commands.addCommand(CommandIDs.openPlayground, {
      label: 'xllm: Open Playground',
      caption: 'Start (once) the Gradio chat playground on this server and open it in a new tab',
      execute: () => openPlayground(app, api, panel)
    });
    app.commands.addCommand(CommandIDs.openChat, {
      label: 'xllm: Open Chat',
      caption: 'A chat with the shared engine in the main area',
      execute: () => openChat(app, api, panel.chat.model)
    });
    app.commands.addCommand(CommandIDs.showPanel, {
      label: 'xllm: Show Panel',
      execute: () => app.shell.activateById(panel.id)
    });
    if (palette) {
      for (const command of [CommandIDs.openPlayground, CommandIDs.openChat, CommandIDs.showPanel]) {
        palette.addItem({ command, category: 'xllm' });
      }
    }
  }
};

export default plugin;
