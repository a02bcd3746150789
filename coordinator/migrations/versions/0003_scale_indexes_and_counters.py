"""range source and date, source counters, indexes for scale

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 17:28:21.228443

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index('ix_leases_worker_state', ['worker_id', 'state'], unique=False)
        batch_op.create_index('ix_leases_range', ['shard_id', 'epoch', 'start'], unique=False)

    with op.batch_alter_table('sources', schema=None) as batch_op:
        batch_op.add_column(sa.Column('assigned_tokens', sa.BigInteger(), server_default='0', nullable=False))

    with op.batch_alter_table('token_ranges', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source', sa.String(length=128), server_default='', nullable=False))
        batch_op.add_column(sa.Column('shard_date', sa.String(length=10), server_default='', nullable=False))
        batch_op.create_index('ix_ranges_next', ['state', 'source', 'epoch', 'shard_date', 'shard_id', 'start'], unique=False)
        batch_op.drop_index('ix_ranges_state_order')  # served the position-ordered pick ix_ranges_next replaces

    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_workers_last_seen'), ['last_seen'], unique=False)

    # Existing rows: copy each range's shard facts, and count what each source has out or trained.
    op.execute(
        'UPDATE token_ranges SET source = (SELECT shards.source FROM shards WHERE shards.id = token_ranges.shard_id), '
        'shard_date = (SELECT shards.date_from FROM shards WHERE shards.id = token_ranges.shard_id)'
    )
    op.execute(
        'UPDATE sources SET assigned_tokens = COALESCE((SELECT SUM(r."end" - r.start) FROM token_ranges r '
        "WHERE r.source = sources.name AND r.state IN ('leased', 'trained')), 0)"
    )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_workers_last_seen'))

    with op.batch_alter_table('token_ranges', schema=None) as batch_op:
        batch_op.create_index('ix_ranges_state_order', ['state', 'epoch', 'start', 'shard_id'], unique=False)
        batch_op.drop_index('ix_ranges_next')
        batch_op.drop_column('shard_date')
        batch_op.drop_column('source')

    with op.batch_alter_table('sources', schema=None) as batch_op:
        batch_op.drop_column('assigned_tokens')

    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_index('ix_leases_worker_state')
        batch_op.drop_index('ix_leases_range')

