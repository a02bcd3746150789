"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-23 17:00:59.141039

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('meta',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=256), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('rounds',
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('first_report_at', sa.Double(), nullable=False),
    sa.Column('reports', sa.Integer(), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('loss_sum', sa.Double(), nullable=False),
    sa.Column('max_group_size', sa.Integer(), nullable=False),
    sa.Column('params_digest', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('number')
    )
    op.create_table('sources',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('language', sa.String(length=32), nullable=False),
    sa.Column('licence', sa.String(length=256), nullable=False),
    sa.Column('weight', sa.Double(), nullable=False),
    sa.Column('date_from', sa.String(length=10), nullable=False),
    sa.Column('date_to', sa.String(length=10), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('workers',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('public_key', sa.LargeBinary(length=32), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('institution', sa.String(length=128), nullable=False),
    sa.Column('device', sa.String(length=128), nullable=False),
    sa.Column('registered_at', sa.Double(), nullable=False),
    sa.Column('last_seen', sa.Double(), nullable=False),
    sa.Column('last_round', sa.Integer(), nullable=False),
    sa.Column('last_loss', sa.Double(), nullable=True),
    sa.Column('tokens_per_second', sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('contributions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=64), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('loss', sa.Double(), nullable=False),
    sa.Column('group_size', sa.Integer(), nullable=False),
    sa.Column('bytes_sent', sa.BigInteger(), nullable=False),
    sa.Column('inner_seconds', sa.Double(), nullable=False),
    sa.Column('wall_seconds', sa.Double(), nullable=False),
    sa.Column('params_digest', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['worker_id'], ['workers.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('shards',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('file', sa.String(length=256), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('tokens', sa.Integer(), nullable=False),
    sa.Column('dtype', sa.String(length=16), nullable=False),
    sa.Column('language', sa.String(length=32), nullable=False),
    sa.Column('source', sa.String(length=128), nullable=False),
    sa.Column('licence', sa.String(length=256), nullable=False),
    sa.Column('date_from', sa.String(length=10), nullable=False),
    sa.Column('date_to', sa.String(length=10), nullable=False),
    sa.ForeignKeyConstraint(['source'], ['sources.name'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('shards', schema=None) as batch_op:
        batch_op.create_index('ix_shards_source_date', ['source', 'date_from'], unique=False)

    op.create_table('token_ranges',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('shard_id', sa.String(length=128), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('start', sa.Integer(), nullable=False),
    sa.Column('end', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.ForeignKeyConstraint(['shard_id'], ['shards.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('token_ranges', schema=None) as batch_op:
        batch_op.create_index('ix_ranges_state_order', ['state', 'epoch', 'start', 'shard_id'], unique=False)

    op.create_table('leases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('range_id', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=64), nullable=False),
    sa.Column('shard_id', sa.String(length=128), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('start', sa.Integer(), nullable=False),
    sa.Column('end', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('deadline', sa.Double(), nullable=False),
    sa.Column('granted_at', sa.Double(), nullable=False),
    sa.Column('finished_at', sa.Double(), nullable=True),
    sa.Column('tokens_consumed', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['range_id'], ['token_ranges.id'], ),
    sa.ForeignKeyConstraint(['shard_id'], ['shards.id'], ),
    sa.ForeignKeyConstraint(['worker_id'], ['workers.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index('ix_leases_state_deadline', ['state', 'deadline'], unique=False)

    op.create_table('lineage',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=64), nullable=False),
    sa.Column('institution', sa.String(length=128), nullable=False),
    sa.Column('lease_id', sa.Integer(), nullable=False),
    sa.Column('shard_id', sa.String(length=128), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('start', sa.Integer(), nullable=False),
    sa.Column('end', sa.Integer(), nullable=False),
    sa.Column('loss', sa.Double(), nullable=False),
    sa.Column('pseudo_gradient_digest', sa.String(length=64), nullable=False),
    sa.Column('config_version', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Double(), nullable=False),
    sa.Column('rewound_at', sa.Double(), nullable=True),
    sa.ForeignKeyConstraint(['lease_id'], ['leases.id'], ),
    sa.ForeignKeyConstraint(['shard_id'], ['shards.id'], ),
    sa.ForeignKeyConstraint(['worker_id'], ['workers.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('lease_id')
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('lineage')
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_index('ix_leases_state_deadline')

    op.drop_table('leases')
    with op.batch_alter_table('token_ranges', schema=None) as batch_op:
        batch_op.drop_index('ix_ranges_state_order')

    op.drop_table('token_ranges')
    with op.batch_alter_table('shards', schema=None) as batch_op:
        batch_op.drop_index('ix_shards_source_date')

    op.drop_table('shards')
    op.drop_table('contributions')
    op.drop_table('workers')
    op.drop_table('sources')
    op.drop_table('rounds')
    op.drop_table('meta')
